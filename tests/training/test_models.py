"""The registry, user factories, --init-from, --freeze-backbone and --pretrained."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from modelship.errors import CheckpointError, ModelError
from modelship.training.models import (
    REGISTRY,
    build_model,
    check_output,
    clean_state_dict,
    freeze_backbone,
    load_matching,
    load_pretrained,
    model_kwargs,
    pretrained_path,
)


@pytest.mark.parametrize("arch", sorted(REGISTRY))
@pytest.mark.parametrize("shape", [[3, 32, 32], [1, 28, 28]], ids=["rgb32", "gray28"])
def test_every_registry_model_builds_for_any_channels_and_classes(arch: str, shape: list[int]) -> None:
    kwargs = model_kwargs(arch, 7, shape, {})
    model = build_model(arch, kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(3, *shape))
    assert tuple(out.shape) == (3, 7)
    # rebuilding from the recorded kwargs alone gives the same architecture
    again = build_model(arch, kwargs)
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }


def test_cnn_adapts_to_tiny_inputs() -> None:
    model = build_model("cnn", model_kwargs("cnn", 2, [1, 4, 4], {"width": 4})).eval()
    assert tuple(model(torch.randn(2, 1, 4, 4)).shape) == (2, 2)


def test_registry_kwargs_pass_through() -> None:
    kwargs = model_kwargs("cnn", 3, [3, 16, 16], {"width": 4})
    assert kwargs == {"num_classes": 3, "in_channels": 3, "image_size": [16, 16], "width": 4}
    model = build_model("cnn", kwargs)
    assert model.classifier[-1].in_features == 16  # 4 * width


def test_user_factory_by_import_path_gets_only_the_kwargs_it_takes() -> None:
    kwargs = model_kwargs("tests.helpers:sign_branch", 3, [3, 2, 2], {})
    assert kwargs == {"num_classes": 3, "in_channels": 3, "image_size": [2, 2]}
    model = build_model("tests.helpers:sign_branch", kwargs)
    assert type(model).__name__ == "SignBranch"


@pytest.mark.parametrize(
    ("arch", "kwargs", "message"),
    [
        (
            "vgg",
            {},
            "unknown model 'vgg'; expected one of cnn, mlp, mobilenet_v3_small, resnet18 or package.module:factory",
        ),
        ("nope.module:make", {}, "cannot import 'nope.module' for model 'nope.module:make'"),
        ("tests.helpers:missing", {}, "'tests.helpers' has no callable 'missing'"),
        ("tests.helpers:not_a_module", {"num_classes": 2}, "returned NotAModule, expected an nn.Module"),
        ("cnn", {"num_classes": 2, "depth": 3}, "does not accept kwargs"),
    ],
)
def test_bad_models_say_what_is_wrong(arch: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_model(arch, kwargs)


def test_a_model_with_the_wrong_output_shape_is_refused() -> None:
    model = build_model("tests.helpers:wrong_output", {"num_classes": 4})
    with pytest.raises(ModelError, match=r"returned \[2, 5\] for a batch of 2; expected \[2, 4\] logits"):
        check_output(model, [3, 8, 8], 4, "tests.helpers:wrong_output")


def test_init_from_reinitialises_a_head_of_another_size_and_names_it(caplog: pytest.LogCaptureFixture) -> None:
    source = build_model("cnn", model_kwargs("cnn", 10, [3, 32, 32], {"width": 8}))
    target = build_model("cnn", model_kwargs("cnn", 4, [3, 32, 32], {"width": 8}))
    with caplog.at_level(logging.INFO):
        reinit = load_matching(target, {"module." + k: v for k, v in source.state_dict().items()}, "--init-from x.pt")
    assert reinit == ["classifier.2.bias", "classifier.2.weight"]
    assert "reinitialised (missing or other shape): classifier.2.bias, classifier.2.weight" in caplog.text
    assert torch.equal(target.features[0][0].weight, source.features[0][0].weight)


def test_init_from_a_foreign_state_dict_is_refused() -> None:
    target = build_model("mlp", model_kwargs("mlp", 4, [3, 8, 8], {}))
    with pytest.raises(CheckpointError, match="shares no parameter"):
        load_matching(target, {"encoder.weight": torch.zeros(3)}, "--init-from other.pt")


def test_freeze_backbone_leaves_only_the_head_trainable() -> None:
    model = build_model("resnet18", model_kwargs("resnet18", 3, [3, 32, 32], {}))
    assert freeze_backbone(model, "resnet18") == ["fc.weight", "fc.bias"]
    user = build_model("tests.helpers:view_flatten", {"num_classes": 2})
    assert freeze_backbone(user, "tests.helpers:view_flatten") == ["fc.weight", "fc.bias"]  # last Linear


def test_clean_state_dict_strips_ddp_and_compile_prefixes() -> None:
    t = torch.ones(1)
    assert list(clean_state_dict({"module._orig_mod.fc.weight": t, "_orig_mod.module.bn.bias": t})) == [
        "fc.weight",
        "bn.bias",
    ]


def test_pretrained_weights_load_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = pretrained_path("resnet18")
    assert path.parent == tmp_path / "hub" / "checkpoints" and path.name.startswith("resnet18-")
    imagenet = build_model("resnet18", {"num_classes": 1000})
    path.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), path)
    model = build_model("resnet18", {"num_classes": 5})
    assert load_pretrained(model, "resnet18") == ["fc.bias", "fc.weight"]
    assert torch.equal(model.layer1[0].conv1.weight, imagenet.layer1[0].conv1.weight)


def test_pretrained_weights_missing_from_the_cache_fail_clearly_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelship.training import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    gone = (tmp_path / "nowhere" / "mobilenet_v3_small-047dcff4.pth").as_uri()  # what an unreachable host gives
    monkeypatch.setattr(models, "weights_url", lambda arch: gone)
    offline = (r"pretrained weights for mobilenet_v3_small are not in the local cache .* and could not be downloaded "
               r".*; download file://.* on a machine with network access")  # fmt: skip
    with pytest.raises(ModelError, match=offline):
        load_pretrained(build_model("mobilenet_v3_small", {"num_classes": 3}), "mobilenet_v3_small")
    assert not list((tmp_path / "hub" / "checkpoints").iterdir())  # nothing half-written


def test_pretrained_weights_are_downloaded_with_their_hash_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    from modelship.training import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    imagenet = build_model("mobilenet_v3_small", {"num_classes": 1000})
    published = tmp_path / "published.pth"  # a local file stands in for torchvision's server
    torch.save(imagenet.state_dict(), published)
    digest = hashlib.sha256(published.read_bytes()).hexdigest()
    good = published.rename(tmp_path / f"mobilenet_v3_small-{digest[:8]}.pth")
    monkeypatch.setattr(models, "weights_url", lambda arch: good.as_uri())
    model = build_model("mobilenet_v3_small", {"num_classes": 3})
    assert load_pretrained(model, "mobilenet_v3_small") == ["classifier.3.bias", "classifier.3.weight"]
    assert torch.equal(model.features[0][0].weight, imagenet.features[0][0].weight)
    assert pretrained_path("mobilenet_v3_small").read_bytes() == good.read_bytes()  # cached for the next run

    bad = good.with_name("mobilenet_v3_small-00000000.pth")  # a name whose hash the content does not have
    good.rename(bad)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "other"))
    monkeypatch.setattr(models, "weights_url", lambda arch: bad.as_uri())
    with pytest.raises(ModelError, match=r"the download of file://.* is damaged \(invalid hash value"):
        load_pretrained(build_model("mobilenet_v3_small", {"num_classes": 3}), "mobilenet_v3_small")
    assert not list((tmp_path / "other" / "hub" / "checkpoints").iterdir())


def test_a_damaged_cached_pretrained_file_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = pretrained_path("resnet18")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(build_model("resnet18", {"num_classes": 5}), "resnet18")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"pretrained weights {path} cannot be read (")
    assert "the cached file is damaged (an interrupted download?): delete it and download https://" in message
    assert "weights_only" not in message


def test_pretrained_is_only_for_the_torchvision_models() -> None:
    with pytest.raises(ModelError, match="--pretrained is available for mobilenet_v3_small, resnet18, not 'cnn'"):
        pretrained_path("cnn")
