"""Issue 21 §6-7 measurements, tested with fake samplers: each prompt's real image scores the ceiling, a sampler
that ignores its prompt scores chance (pagoda/alignment.py, bench/t2i_eval.py)."""
import numpy as np
import pytest
import torch

from helpers import StandInInception

from pagoda import alignment as A, classifier as C
from pagoda.metrics import FeatureExtractor, MetricsError, ReferenceStats


def quick(task: str):
    """An emoji classifier at 8 px trained in seconds."""
    return C.train_classifier(C.classifier_config(8, task, layers="16p,32p", epochs=4))


@pytest.fixture(scope="module")
def measures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    for task in ("emoji-subgroup", "emoji-tone"):
        C.save_classifier(quick(task), folder / C.classifier_file(8, task), 0.0)
    ext = FeatureExtractor(model=StandInInception(), batch_size=100)
    return A.Measures(folder, n=200, extractor=ext, ref_n=200, cache_dir=tmp_path_factory.mktemp("fid"))


def constant_sampler(generate: A.Generate, caption: str) -> A.Generate:
    """Ignores its prompts: the image of `caption` for every one of them."""
    return lambda prompts, seed: generate([caption], seed).expand(len(prompts), -1, -1, -1)


def test_real_images_score_the_ceiling_and_a_prompt_blind_sampler_chance(measures, monkeypatch):
    monkeypatch.setattr(C, "train_classifier", lambda *a, **k: pytest.fail("retrained a cached classifier"))
    real = measures.row("real", None, A.real_sampler(8), fid="real halves")
    x, y = C.task_of("emoji-subgroup").labelled("train", 8)
    own = A.RealEmoji(8).ids(measures.prompts["train"])  # 'all' indices -> the training images of the same captions
    train_index = {c: i for i, c in enumerate(A.EmojiDataset("train", 8).captions)}
    idx = torch.tensor([train_index[c] for c in measures.prompts["train"]])
    assert len(own) == 200 and real["subgroup"] == measures.classifier("emoji-subgroup", 8).accuracy(x[idx], y[idx])
    assert real["subgroup"] > 0.5 and real["tone_five"] > 0.5 and real["top5"] > real["top1"] > 0.1
    assert np.isfinite(real["fid"]) and real["n"] == 100  # the floor: two halves of the 200 reference images
    blind = measures.row("one image", None, constant_sampler(A.real_sampler(8), "red apple"), fid="samples")
    shares = np.bincount(measures.real.subgroup_labels(measures.prompts["train"])) / 200
    assert np.isclose(shares, blind["subgroup"]).any() and blind["subgroup"] <= shares.max() + 1e-6 < 0.2
    assert blind["tone_five"] == pytest.approx(0.2, abs=1e-6)  # balanced over the 5 tones: exactly chance
    assert blind["tone_held_out"] == blind["dark_elsewhere"]  # tone-blind: the held-out dark is not told apart
    assert blind["top1"] <= 1 / 200 and blind["fid"] > real["fid"] and blind["kid_x1e3"] > 0


def test_retrieval_at_64_px_is_exact_and_noise_is_chance(measures):
    prompts = measures.prompts["held-out"]
    assert measures.retrieval.rates(A.draw(A.real_sampler(64), prompts, 0), prompts) == {"top1": 1.0, "top5": 1.0}
    noise = measures.retrieval.rates(A.draw(A.noise_sampler(16), prompts, 0), prompts)
    assert noise["top1"] <= 1 / len(prompts) and noise["top5"] <= 2 / len(prompts)
    up = A.draw(A.real_sampler(16, via=8), prompts[:3], 0)
    assert up.shape == (3, 3, 16, 16) and torch.equal(up, A.resample(A.draw(A.real_sampler(8), prompts[:3], 0), 16))


def test_draw_seeds_each_call_and_checks_the_sampler():
    prompts = ["red apple"] * (A.CALL + 1)
    x = A.draw(A.noise_sampler(8), prompts, seed=3)
    assert torch.equal(x[A.CALL], A.noise_sampler(8)(["red apple"], 3 * A.SEED_STRIDE + 1)[0])
    with pytest.raises(MetricsError, match="one 3×R×R image per prompt"):
        A.draw(lambda p, s: torch.zeros(len(p), 1, 8, 8), prompts, 0)
    with pytest.raises(ValueError, match="'blue apple' is not an emoji caption"):
        A.RealEmoji(8).ids(["blue apple"])
    with pytest.raises(ValueError, match="names no single skin tone"):
        A.tone_accuracy(None, torch.zeros(1, 3, 8, 8), ["red apple"])


def test_prompt_sets_and_real_vs_real():
    tones = A.tone_prompts()
    assert len(tones) == 100 and [C.caption_tone(p) for p in tones[:5]] == [0, 1, 2, 3, 4]
    assert sum(p.endswith(": dark skin tone") for p in tones) == 20
    assert A.fid_prompts(5) == A.fid_prompts()[:5] and len(A.fid_prompts()) == 3480
    f = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    assert A.real_vs_real(ReferenceStats.from_features(f, "x", "clean"))["n"] == 20
    with pytest.raises(MetricsError, match="keeps 10 of its 40 features"):
        A.real_vs_real(ReferenceStats.from_features(f, "x", "clean", keep=10))
