"""The Fashion-MNIST classifier of the class-accuracy metric: training, scoring, its cache file."""
from __future__ import annotations

import pytest
import torch

from helpers import quick_classifier

from pagoda import classifier as C
from pagoda.data import FashionMNIST
from pagoda.io import CheckpointError, save_checkpoint


@pytest.fixture(scope="module")
def model() -> C.Classifier:
    torch.manual_seed(0)
    return quick_classifier(16)


def test_trains_quickly_and_scores_true_labels_high_shuffled_at_chance(model):
    test = FashionMNIST("test", resolution=16)
    x, y = test.images[:2000], test.labels[:2000]
    assert model.accuracy(x, y) > 0.8
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert abs(model.accuracy(x, shuffled) - 0.1) < 0.03
    assert C.split_accuracy(model, n=2000) == model.accuracy(x, y)
    assert model.correct(x[:5], y[:5]).dtype == torch.bool and not model.training


def test_training_is_seeded(model):
    again = quick_classifier(16)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_cache_is_reused_and_round_trips(model, tmp_path, monkeypatch):
    path = C.save_classifier(model, tmp_path / C.classifier_file(16), 0.5)
    assert path.name == "fmnist-16.pt" and torch.load(path, weights_only=True)["test_accuracy"] == 0.5
    monkeypatch.setattr(C, "train_classifier", lambda *a, **k: pytest.fail("retrained a cached classifier"))
    loaded = C.classifier_for(tmp_path, 16)
    x = FashionMNIST("test", resolution=16).images[:200]
    assert loaded.config == model.config and torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint", "is damaged or not a checkpoint"),
    ({"kind": "pagoda.generator", "state_dict": {}}, "is not a pagoda classifier"),
    ({"kind": C.CLASSIFIER, "config": {"resolution": 16}, "state_dict": {}}, "unusable classifier"),
])
def test_damaged_or_foreign_cache_one_line(tmp_path, content, message):
    path = tmp_path / C.classifier_file(16)
    path.write_bytes(content) if isinstance(content, bytes) else save_checkpoint(content, path)
    with pytest.raises(CheckpointError, match=message) as e:
        C.classifier_for(tmp_path, 16)
    assert "\n" not in str(e.value) and str(path) in str(e.value) and "fix: delete it" in str(e.value)


def test_other_resolution_file_and_images_refused(model, tmp_path):
    C.save_classifier(model, tmp_path / C.classifier_file(8), 0.5)
    with pytest.raises(CheckpointError, match="classifies 16px images, not 8px"):
        C.classifier_for(tmp_path, 8)
    with pytest.raises(ValueError, match="takes 1×16×16 images"):
        model.correct(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [8, 32])
def test_default_classifier_reaches_90_percent(resolution):
    """The default configurations on the whole train split (minutes on one core), scored on all 10 000 test images."""
    assert C.split_accuracy(C.train_classifier(C.classifier_config(resolution))) >= 0.9


def test_flip_trained_classifier_predicts_with_test_time_flip():
    """A network trained with flips averages the probabilities of x and its mirror: mirror-invariant predictions;
    one trained without flips does not."""
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    flipped = C.Classifier(C.classifier_config(8, layers="8p,16", flip=0.5)).eval()
    plain = C.Classifier(C.classifier_config(8, layers="8p,16", flip=0.0)).eval()
    with torch.no_grad():
        assert torch.allclose(flipped.probabilities(x), flipped.probabilities(x.flip(-1)), atol=1e-6)
        assert not torch.allclose(plain.probabilities(x), plain.probabilities(x.flip(-1)), atol=1e-6)
        assert torch.allclose(plain.probabilities(x), plain(x).softmax(1))


def test_emoji_tasks_are_colour_unflipped_and_cached_under_their_own_names(tmp_path):
    cfg = C.classifier_config(8, "emoji-tone", layers="8p", epochs=0.1)
    assert cfg.flip == 0 and C.classifier_config(64, "emoji-subgroup").flip == 0
    assert C.classifier_file(8, "emoji-tone") == "emoji-tone-8.pt" and C.classifier_file(8) == "fmnist-8.pt"
    assert C.caption_tone("waving hand: dark skin tone") == 4 and C.caption_tone("red apple") is None
    assert C.caption_tone("kiss: woman, man, light skin tone, dark skin tone") is None  # two tones: not a tone class
    x, y = C.task_of("emoji-tone").labelled("train", 8)
    assert x.shape == (1328, 3, 8, 8) and torch.bincount(y).tolist() == [275, 264, 270, 267, 252]
    model = C.train_classifier(cfg)
    assert model(x[:2]).shape == (2, 5) and C.Classifier(C.classifier_config(8, "emoji-subgroup", layers="8p"))(x[:2]).shape == (2, 99)
    C.save_classifier(model, tmp_path / C.classifier_file(8, "emoji-subgroup"), 0.5)  # a tone network under a subgroup name
    with pytest.raises(CheckpointError, match="classifies 'emoji-tone', not 'emoji-subgroup'"):
        C.classifier_for(tmp_path, 8, task="emoji-subgroup")
    with pytest.raises(ValueError, match="unknown classifier task 'emoji'; fix: use one of fmnist, emoji-subgroup"):
        C.classifier_config(8, "emoji")
