"""The training path with text (issue 21 §4, §9): a text teacher, the latent cache under the caption, text stages,
the text-conditioned discriminator, `pagoda sample --prompt`."""
from dataclasses import replace

import pytest
import torch

from helpers import build_tiny_text_run, invoke, ok, one_line_error, tensors
from pagoda.data import EmojiDataset
from pagoda.decoder import Generator, load_generator
from pagoda.discriminators import make_discriminator
from pagoda.encoder import LatentStore
from pagoda.io import load_checkpoint, save_checkpoint
from pagoda.losses import LossConfigError
from pagoda.teacher import Denoiser, guided, load_teacher, teacher_checkpoint
from pagoda.text import BuiltinTextConfig, TextEmbedding, drop_captions, make_text_encoder, null_text
from pagoda.unet import PRESETS, UNet

SMALL_TEXT = BuiltinTextConfig(width=32, layers=1, heads=2)


def text_teacher(seed: int = 0) -> Denoiser:
    """A random tiny RGB text teacher (8 px) with a small builtin encoder; ADM's zero-initialised layers made random,
    so that the output depends on the text."""
    torch.manual_seed(seed)
    enc = make_text_encoder("builtin", SMALL_TEXT)
    cfg = replace(PRESETS["tiny"], in_channels=3, out_channels=3, num_classes=None, text_dim=enc.width)
    unet = UNet(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return Denoiser(unet, text_encoder=enc).eval()


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """teacher (6 steps) + latent cache + stage-08 + grown stage-16 on the emoji, tiny widths and steps."""
    return build_tiny_text_run(tmp_path_factory.getbasetemp())


def test_tiny_text_run_end_to_end(text_run, tmp_path):
    teacher_path, run = text_run
    T = load_teacher(teacher_path)
    text = T.encode_text(["red apple", ""])
    assert T.unet.config.text_dim == T.text_encoder.width and not any(p.requires_grad for p in T.parameters())
    assert text.mask[1].sum() == 0 and text.pooled[1].abs().sum() == 0  # the null caption
    # the cache: no flip, each image encoded under its caption, the caption index kept as the label
    store, captions = LatentStore(run / "latents"), EmojiDataset("train", 8).captions
    assert store.shape[1] == 1 and torch.equal(store.labels, store.indices) and int(store.labels.max()) < len(captions)
    G8, G16 = load_generator(run / "stage-08" / "generator.pt"), load_generator(run / "stage-16" / "generator.pt")
    assert G16.resolution == 16 and G16.config.text_dim == T.unet.config.text_dim
    for G in (G8, G16):  # the teacher's frozen encoder, carried unchanged
        assert all(torch.equal(a, b) for a, b in zip(G.text_encoder.state_dict().values(),
                                                     T.text_encoder.state_dict().values()))
    z = G16.sigma_max * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = G16(z, G16.encode_text(["red apple", "red apple"])), G16(z, G16.encode_text(["cat face", "cat face"]))
    assert a.shape == (2, 3, 16, 16) and not torch.equal(a, b)
    out = tmp_path / "prompts.png"
    r = invoke("sample", "--checkpoint", run, "--prompt", "red apple", "--prompt", "cat face", "--n", 3, "--out", out)
    assert r.exit_code == 0, r.output
    assert out.is_file()


def test_class_model_and_text_model_refuse_each_others_condition(text_run, tmp_path):
    _, run = text_run
    torch.manual_seed(0)
    cls_G = save_checkpoint(Generator.from_teacher(Denoiser(UNet(PRESETS["tiny"]))).to_checkpoint(), tmp_path / "g.pt")
    r = invoke("sample", "--checkpoint", cls_G, "--prompt", "red apple", "--out", tmp_path / "a.png")
    assert r.exit_code != 0 and "not text-conditional" in r.output and len(r.output.strip().splitlines()) == 1
    r = invoke("sample", "--checkpoint", run, "--class", 1, "--out", tmp_path / "b.png")
    assert r.exit_code != 0 and "text-conditional" in r.output and "--prompt" in r.output
    for bad, why in (("", "empty prompt"), ("x" * 200, "longer than the text context")):
        r = invoke("sample", "--checkpoint", run, "--prompt", bad, "--out", tmp_path / "c.png")
        assert r.exit_code != 0 and why in r.output
    assert not any(tmp_path.glob("[abc].png"))


def test_caption_dropout_draws_the_null_caption_at_its_rate():
    captions = [f"emoji {i}" for i in range(20_000)]
    dropped = drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    rate = sum(c == "" for c in dropped) / len(captions)
    assert 0.09 < rate < 0.11
    assert dropped == drop_captions(captions, 0.1, torch.Generator().manual_seed(0))  # seeded
    assert all(d in ("", c) for d, c in zip(dropped, captions))
    assert drop_captions(captions[:100], 0.0) == captions[:100]


@pytest.mark.parametrize("kind", ["projected", "multiscale"])
def test_discriminator_sees_the_pooled_text(kind):
    torch.manual_seed(0)
    D = make_discriminator(kind, 16, 3, None, width=16, input_size=32, pretrained=False, text_dim=8).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    tokens, mask = torch.zeros(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    red, cat = (TextEmbedding(tokens, mask, torch.randn(2, 8, generator=torch.Generator().manual_seed(s))) for s in (1, 2))
    with torch.no_grad():
        out_red, out_red2, out_cat = (torch.cat([h.flatten(1) for h in D(x, t)], 1) for t in (red, red, cat))
    assert torch.equal(out_red, out_red2) and not torch.allclose(out_red, out_cat)
    plain = make_discriminator(kind, 16, 3, None, width=16, input_size=32, pretrained=False)
    with pytest.raises(LossConfigError, match="text_dim"):
        plain(x, red)


def test_guided_text_teacher_uses_the_empty_caption_as_null():
    T = text_teacher()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([2.0, 0.5])
    with torch.no_grad():
        text = T.encode_text(["red apple", "cat face"])
        cond, empty, null = T(x, sigma, text), T(x, sigma, T.encode_text(["", ""])), T(x, sigma, null_text(text))
        both = guided(T, 3.0)(x, sigma, text)
    torch.testing.assert_close(empty, null)  # the empty caption is the null condition
    torch.testing.assert_close(both, null + 3.0 * (cond - null), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cond, null)


def test_text_generator_checkpoint_carries_the_frozen_encoder(tmp_path):
    T = text_teacher()
    G = Generator.from_teacher(T, guidance=True)
    G.set_trainable(None)
    assert not any(p.requires_grad for p in G.text_encoder.parameters())
    assert any(k.startswith("text_encoder.") for k in G.state_dict())
    G2 = G.grow(16)
    path = save_checkpoint(G2.to_checkpoint(), tmp_path / "g.pt")
    G3 = load_generator(path)
    z = G.sigma_max * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = G3.encode_text(["red apple", "cat face"])
        torch.testing.assert_close(G3(z, text, torch.tensor([1.0, 2.0])), G2.eval()(z, text, torch.tensor([1.0, 2.0])))
    T2 = load_teacher(save_checkpoint(teacher_checkpoint(T), tmp_path / "t.pt"))
    torch.testing.assert_close(T2.encode_text(["red apple"]).tokens, T.encode_text(["red apple"]).tokens)


# --text-encoder: the CLI, a t5: run end to end, the dry run of a text run ----------------------------

def test_t5_text_run_end_to_end(tiny_t5, tmp_path, monkeypatch):
    """`pagoda teacher train` + `pagoda train` with --text-encoder t5:PATH on the emoji (tiny widths and steps), then
    `pagoda sample --prompt`: checkpoints store the T5 as its spec only, its weights never change, prompts matter."""
    import numpy as np
    import transformers

    from pagoda import text as text_module
    from pagoda.plan import dry_run
    from pagoda.train import TrainConfig
    spec, run = f"t5:{tiny_t5}", tmp_path / "run"
    reference = transformers.T5EncoderModel.from_pretrained(tiny_t5).state_dict()
    built = []  # every T5 encoder the commands build (the teacher's, trained beside, first)
    init = text_module.T5TextEncoder.__init__

    def spy(self, *args, **kw):
        init(self, *args, **kw)
        built.append(self)
    monkeypatch.setattr(text_module.T5TextEncoder, "__init__", spy)
    ok(invoke("teacher", "train", "--preset", "tiny", "--data", "emoji", "--steps", 6, "--batch", 16, "--text-encoder",
              spec, "--out", run / "teacher", "--no-progress"))
    # the run finds RUN/teacher and accepts the same encoder (another spelling of its folder)
    ok(invoke("train", "--data", "emoji", "--res", 16, "--preset", "tiny", "--encode-images", 16, "--encode-steps", 4,
              "--text-encoder", f"t5:{tiny_t5}/../{tiny_t5.name}", "--out", run, "--no-progress"))
    for path in (run / "teacher" / "teacher.pt", run / "stage-08" / "generator.pt", run / "stage-16" / "generator.pt"):
        ck = load_checkpoint(path)
        assert ck["text_encoder"] == {"spec": f"t5:{tiny_t5.resolve()}"}  # the spec, never T5's weights
        model = load_teacher(path) if path.name == "teacher.pt" else load_generator(path)
        names = [name.removeprefix("/state_dict/").removeprefix("unet.") for name, _ in tensors(ck)]
        assert sorted(names) == sorted(model.unet.state_dict())  # every tensor of the file is the UNet's
    assert built and all(not any(p.requires_grad for p in enc.model.parameters()) for enc in built)
    for enc in built:  # frozen: the weights every encoder of the run held, after training, are the folder's
        assert all(torch.equal(v, reference[k]) for k, v in enc.model.state_dict().items())
    T = load_teacher(run / "teacher" / "teacher.pt")
    assert T.unet.config.text_dim == 32 and T.text_encoder.spec == f"t5:{tiny_t5.resolve()}"
    ok(invoke("sample", "--checkpoint", run, "--prompt", "red apple", "--out", tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").is_file()
    for prompt, name in (("red apple", "a.npz"), ("cat face", "b.npz")):  # image k of prompt 0: the same z
        ok(invoke("sample", "--checkpoint", run, "--prompt", prompt, "--n", 2, "--npz", tmp_path / name, "--no-progress"))
    a, b = (np.load(tmp_path / name)["arr_0"] for name in ("a.npz", "b.npz"))
    assert a.shape == (2, 16, 16, 3) and not np.array_equal(a, b)
    # its plan counts T5 (frozen) in the teacher, as the run built it, and steps with it
    plan = ok(invoke("train", "--data", "emoji", "--res", 16, "--preset", "tiny", "--teacher-preset", "tiny",
                     "--text-encoder", spec, "--dry-run", "--out", tmp_path / "never"))
    assert f"text encoder t5:{tiny_t5.resolve()}, 0.0M params (width 32, 96 positions): frozen, carried" in plan
    assert plan.count("finite True") == 2 and not (tmp_path / "never").exists()
    cfg = TrainConfig(data="emoji", res=16, preset="tiny", teacher_preset="tiny", text_encoder=spec)
    t5_params = sum(p.numel() for p in transformers.T5EncoderModel.from_pretrained(tiny_t5).parameters())
    counted = dry_run(cfg, ranks=1, width=32, steps=0)["teacher"]
    assert counted["params"] == sum(p.numel() for p in T.parameters()) + t5_params and not counted["text"]["trained"]


def test_text_encoder_option_refusals(text_run, tiny_t5, tmp_path):
    """--text-encoder on data without captions, and one that is not the given teacher's: one line, nothing written."""
    teacher, _ = text_run
    for args in (["train"], ["teacher", "train"], ["train", "--dry-run"]):
        one_line_error(invoke(*args, "--text-encoder", "builtin", "--out", tmp_path / "x"),
                       "--text-encoder builtin: the data fashion-mnist has no captions", "fix: drop --text-encoder")
    for extra in ([], ["--dry-run"]):
        one_line_error(invoke("train", "--data", "emoji", "--res", 16, "--preset", "tiny", "--teacher", teacher,
                              "--text-encoder", f"t5:{tiny_t5}", "--out", tmp_path / "x", *extra),
                       f"the teacher {teacher} has the text encoder builtin", "fix: drop --text-encoder")
    one_line_error(invoke("train", "--data", "emoji", "--res", 16, "--preset", "tiny", "--teacher-preset", "tiny",
                          "--text-encoder", "clip", "--dry-run", "--out", tmp_path / "x"), "unknown text encoder 'clip'")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # (a run creates --out first: it stays empty)
    # the teacher's own encoder is accepted (and is all a run on it can use)
    ok(invoke("train", "--data", "emoji", "--res", 16, "--preset", "tiny", "--teacher", teacher, "--text-encoder",
              "builtin", "--dry-run", "--out", tmp_path / "x"))


def test_dry_run_of_a_text_run_builds_what_the_run_builds(text_run, monkeypatch):
    """The plan of the tiny text run counts the parameters of the teacher, G and D the run built (text encoder and
    text key/value projections included), and its steps run text-conditioned G and D."""
    from pagoda import plan as plan_module
    from pagoda.train import TrainConfig
    teacher_path, run = text_run
    T = load_teacher(teacher_path)
    seen = []

    class Spy(plan_module.StageTrainer):
        def train_step(self):  # captions -> text for G, the teacher's encoder in G, e(y) = W·pooled text in D
            text_D = any(isinstance(m, torch.nn.Linear) and m.in_features == self.G.config.text_dim for m in self.D.modules())
            seen.append((self.condition is not None, self.G.text_encoder is not None, text_D))
            return super().train_step()
    monkeypatch.setattr(plan_module, "StageTrainer", Spy)
    cfg = TrainConfig(data="emoji", res=16, preset="tiny", teacher_preset="tiny", encode_images=16, encode_steps=4)
    plan = plan_module.dry_run(cfg, ranks=1, width=32, steps=1)
    assert plan["teacher"]["params"] == sum(p.numel() for p in T.parameters())
    assert plan["teacher"]["text"] == {"encoder": "builtin", "params": sum(p.numel() for p in T.text_encoder.parameters()),
                                       "width": T.unet.config.text_dim, "context": T.text_encoder.context,
                                       "trained": True, "captions": 3480}
    for row in plan["stages"]:
        G, ck = load_generator(run / row["name"] / "generator.pt"), load_checkpoint(run / row["name"] / "checkpoint.pt")
        assert row["G_params"] == sum(p.numel() for p in G.parameters())
        assert row["D_params"] == sum(t.numel() for sd in ck["D"] for k, t in sd.items()  # not spectral norm's u, v
                                      if not k.endswith(("._u", "._v")))
    assert seen == [(True, True, True)] * 2 and all(r["finite"] for r in plan["reduced"]["stages"])
    assert plan["data"]["flips"] == 1 and plan["latent_cache_bytes"] == 16 * 3 * 8 * 8 * 2
    on_file = plan_module.dry_run(replace(cfg, teacher=str(teacher_path)), ranks=1, width=32, steps=0)
    assert on_file["teacher"]["params"] == plan["teacher"]["params"] and not on_file["teacher"]["text"]["trained"]
