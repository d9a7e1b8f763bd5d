"""Text: the byte tokeniser, the builtin and t5: encoders, and text conditioning in the ADM UNet (issue 21 §2, §3)."""
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from pagoda.decoder import FADE_MODE, Generator
from pagoda.text import (CONTEXT, BuiltinTextConfig, ByteTokenizer, TextEmbedding, TextError, canonical_spec,
                         check_prompt, make_text_encoder, masked_mean, text_params)
from pagoda.unet import PRESETS, AttentionBlock, UNet

TEXT_DIM = 64


def _randomise(module, std=0.05, seed=0):
    """Trained-looking weights: every parameter random and non-zero (breaks ADM's zero init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _text(captions, seed=0, dim=TEXT_DIM) -> TextEmbedding:
    torch.manual_seed(seed)
    return make_text_encoder("builtin", BuiltinTextConfig(width=dim, layers=1)).eval()(captions)


# Tokeniser and prompts ---------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(captions=st.lists(st.text(max_size=24), min_size=1, max_size=4))
def test_tokeniser_round_trips_and_is_deterministic(captions):
    tok = ByteTokenizer()
    ids, mask = tok.encode(captions)
    assert ids.shape == mask.shape == (len(captions), CONTEXT) and ids.dtype == torch.long
    assert tok.decode(ids) == captions
    assert torch.equal(ids, ByteTokenizer().encode(captions)[0])  # a fresh tokeniser: the same ids
    assert mask.sum(1).tolist() == [len(c.encode("utf-8")) for c in captions]
    assert torch.equal(mask, ids > 0) and int(ids.max()) < ByteTokenizer.vocab_size


def test_tokeniser_known_ids_and_bad_prompts():
    ids, mask = ByteTokenizer(context=8).encode(["ab", "", "é"])
    assert ids.tolist() == [[98, 99, 0, 0, 0, 0, 0, 0], [0] * 8, [196, 170, 0, 0, 0, 0, 0, 0]]
    assert not mask[1].any()  # the empty caption: all padding
    with pytest.raises(TextError, match="longer than the text context of 8"):
        ByteTokenizer(context=8).encode(["red apple"])
    assert check_prompt("red apple") == "red apple"
    with pytest.raises(TextError, match=r"empty prompt.*fix: give a caption"):
        check_prompt("  ")
    with pytest.raises(TextError, match=f"100 bytes, longer than the text context of {CONTEXT}; fix: shorten it"):
        check_prompt("x" * 100)


# The builtin encoder -----------------------------------------------------------------------------

def test_builtin_encoder_shapes_null_caption_and_batch_independence():
    out = _text(["red apple", "", "cat face"])
    assert out.tokens.shape == (3, CONTEXT, TEXT_DIM) and out.pooled.shape == (3, TEXT_DIM)
    assert out.mask.sum(1).tolist() == [9, 0, 8]
    assert torch.equal(out.pooled[1], torch.zeros(TEXT_DIM))  # the null caption pools to 0
    torch.testing.assert_close(out.pooled[0], out.tokens[0, :9].mean(0))
    alone = _text(["cat face"])  # a caption's embedding does not depend on the rest of the batch
    torch.testing.assert_close(alone.tokens[0], out.tokens[2], atol=1e-6, rtol=0)
    assert (out.pooled[0] - out.pooled[2]).abs().max() > 1e-3  # different captions, different embeddings
    with pytest.raises(TextError, match="unknown text encoder 'clip'"):
        make_text_encoder("clip")
    with pytest.raises(TextError, match="not divisible by 3 heads"):
        make_text_encoder("builtin", BuiltinTextConfig(width=64, heads=3))


# Text in the UNet --------------------------------------------------------------------------------

def _text_unet(**kw) -> UNet:
    net = UNet(replace(PRESETS["tiny"], num_classes=None, text_dim=TEXT_DIM, **kw))
    _randomise(net)
    return net


def test_attention_with_all_padding_text_equals_attention_without_text():
    torch.manual_seed(0)
    block = AttentionBlock(64, 32, "flash", text_channels=48)
    _randomise(block)
    x = torch.randn(2, 64, 4, 4)
    padding = (torch.randn(2, 48, 7), torch.zeros(2, 7, dtype=torch.bool))
    torch.testing.assert_close(block(x, padding), block(x), atol=1e-6, rtol=0)
    some = (padding[0], torch.tensor([[True] * 3 + [False] * 4] * 2))
    assert (block(x, some) - block(x)).abs().max() > 1e-3
    # padding is ignored: changing the padded tokens changes nothing
    other = (torch.cat([some[0][..., :3], torch.randn(2, 48, 4)], -1), some[1])
    torch.testing.assert_close(block(x, other), block(x, some), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["flash", "legacy"])
def test_unet_null_caption_is_the_network_without_text(layout):
    net = _text_unet(qkv_layout=layout)
    plain = UNet(replace(net.config, text_dim=None))
    missing = plain.load_state_dict(net.state_dict(), strict=False)
    assert missing.missing_keys == [] and all(k.startswith(("encoder_proj.", "encoder_pooling.")) or ".encoder_kv." in k
                                              for k in missing.unexpected_keys)
    x, t = torch.randn(2, 1, 8, 8), torch.randn(2)
    with torch.no_grad():
        null = _text(["", ""])
        torch.testing.assert_close(net(x, t, text=null), plain(x, t), atol=1e-5, rtol=0)
        cond = net(x, t, text=_text(["red apple", "cat face"]))
    assert (cond - plain(x, t)).abs().max() > 1e-3 and (cond[0] - cond[1]).abs().max() > 1e-3


def test_unet_text_errors():
    net = _text_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.randn(2)
    with pytest.raises(ValueError, match="text-conditioned: pass text"):
        net(x, t)
    with pytest.raises(ValueError, match=r"text tokens must be \(B=2, L, 64\)"):
        net(x, t, text=_text(["a", "b"], dim=128))
    with pytest.raises(ValueError, match="no text conditioning"):
        UNet(PRESETS["tiny"])(x, t, torch.tensor([0, 1]), text=_text(["a", "b"]))


def test_growth_with_text_is_function_preserving_and_freezes_the_text_layers():
    G = Generator(_text_unet())
    z, text = torch.randn(2, 1, 8, 8) * 80, _text(["red apple", "cat face"])
    with torch.no_grad():
        H = G.grow(64)
        torch.testing.assert_close(H(z, text), F.interpolate(G(z, text), scale_factor=2, mode=FADE_MODE),
                                   atol=1e-6, rtol=0)
        _randomise(H, seed=1)
        H.set_alpha(1.0)
        K = H.grow()
        torch.testing.assert_close(K(z, text), F.interpolate(H(z, text), scale_factor=2, mode=FADE_MODE),
                                   atol=1e-6, rtol=0)
    trainable = K.set_trainable(activate_from=1)
    assert not any(n.startswith(("encoder_proj.", "encoder_pooling.")) for n in trainable)


# t5: a frozen local T5 (the `tiny_t5` fixture: tests/conftest.py) ---------------------------------

def test_t5_encoder_from_a_local_folder(tiny_t5):
    import transformers
    enc = make_text_encoder(f"t5:{tiny_t5}")
    assert enc.width == 32 and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # frozen: stays in eval mode
    out = enc(["red apple", "", "cat"])
    assert out.tokens.shape == (3, CONTEXT, 32) and out.mask.sum(1).tolist() == [9, 0, 3]
    ref = transformers.T5EncoderModel.from_pretrained(tiny_t5)(
        input_ids=torch.tensor([[ord(c) - 93 if c != " " else 3 for c in "cat"]])).last_hidden_state
    torch.testing.assert_close(out.tokens[2, :3], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, masked_mean(out.tokens, out.mask))
    assert torch.equal(out.pooled[1], torch.zeros(32))  # the null caption
    net = UNet(replace(PRESETS["tiny"], num_classes=None, text_dim=enc.width))
    assert net(torch.randn(3, 1, 8, 8), torch.randn(3), text=out).shape == (3, 1, 8, 8)
    with pytest.raises(TextError, match="longer than the text context"):
        enc(["a" * (CONTEXT + 1)])
    (tiny_t5.parent / "no-weights").mkdir()
    (tiny_t5.parent / "no-weights" / "config.json").write_text("{}")
    with pytest.raises(TextError, match="cannot load a T5 encoder and tokenizer .*; fix: save both with save_pretrained"):
        make_text_encoder(f"t5:{tiny_t5.parent / 'no-weights'}")


def test_t5_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(TextError, match=r"not a T5 folder \(no config.json\); fix: pass t5:PATH"):
        make_text_encoder(f"t5:{tmp_path}")
    with pytest.raises(TextError, match="unknown text encoder 't5:'"):
        make_text_encoder("t5:")
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(TextError, match=r"needs the optional package transformers; fix: pip install 'pagoda\[t5\]'"):
        make_text_encoder(f"t5:{tmp_path}")


def test_t5_spec_is_the_absolute_folder(tiny_t5, monkeypatch):
    """A checkpoint's spec names the folder whatever the working directory: two spellings, one spec."""
    monkeypatch.chdir(tiny_t5.parent)
    enc = make_text_encoder(f"t5:{tiny_t5.name}")
    assert enc.spec == canonical_spec(f"t5:./{tiny_t5.name}/") == f"t5:{tiny_t5.resolve()}"
    assert canonical_spec("builtin") == "builtin" and text_params(enc) == sum(p.numel() for p in enc.model.parameters())
    assert text_params(enc) > 0 == sum(p.numel() for p in enc.parameters())  # T5 is hidden: never in a state dict
    with pytest.raises(TextError, match="unknown text encoder 'T5:x'"):
        canonical_spec("T5:x")
