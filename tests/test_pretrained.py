"""Published weights through timm's front door: ``timm.create_model(name, pretrained=True)``.

Downloads run on timm's real paths without a network and without mocks: a loopback HTTP server (127.0.0.1, a
thread) serves a published-format fixture under the file name the tag's URL ends in (the URL swapped with
``pretrained_cfg_overlay``, the torch hub cache in a temporary TORCH_HOME), and the Hugging Face families read an
offline hub cache laid out as huggingface_hub lays it (``HF_HUB_OFFLINE=1``, HF_HOME in a temporary folder, in a
subprocess since huggingface_hub reads both when imported). The logits equal those of the same file loaded by
hand (`vig.load_checkpoint`), and where ../shared holds the published code's outputs, those too (float64).
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg

import train
import vig.models  # noqa: F401  (registers the models)
from tests.shared_files import shared_path
from tests.train_helpers import last_json_line, make_image_folder
from vig.checkpoint import extract_state_dict, load_checkpoint, read_checkpoint
from vig.errors import WeightsUnavailableError
from vig.models.isotropic import SVIG_CHECKPOINTS, svig_tag
from vig.models.pretrained import VigPretrainedCfg
from vig.tools.macs import main as macs_main
from vig.tools.visualize import main as visualize_main
from vig.trainer.config import ModelSection
from vig.trainer.setup import build_model

ROOT = Path(__file__).resolve().parents[1]

# every published file this project registers, by tag (see the model files' default_cfgs and README)
PUBLISHED = {
    "vig_ti_224_gelu.in1k": "vig_ti_74.5.pth", "vig_s_224_gelu.in1k": "vig_s_80.6.pth",
    "vig_b_224_gelu.in1k": "vig_b_82.6.pth",
    "pvig_ti_224_gelu.in1k": "pvig_ti_78.5.pth.tar", "pvig_s_224_gelu.in1k": "pvig_s_82.1.pth.tar",
    "pvig_m_224_gelu.in1k": "pvig_m_83.1.pth.tar", "pvig_b_224_gelu.in1k": "pvig_b_83.66.pth.tar",
    "pvig_m_224_gelu.in21k": "pvig_m_im21k_90e.pth",
    **{f"svig_ti_224_gelu.{svig_tag(start, dec)}": file for start, dec, file, _, _ in SVIG_CHECKPOINTS},
    "mobilevig_s.in1k": "MobileViG_S_78_2.pth.tar", "mobilevig_m.in1k": "MobileViG_M_80_7.pth.tar",
    "mobilevig_b.in1k": "MobileViG_B_82_6.pth.tar",
    "greedyvig_s.in1k": "S_GreedyViG_81_1.pth", "greedyvig_m.in1k": "M_GreedyViG_82_9.pth",
    "greedyvig_b.in1k": "B_GreedyViG_83_9.pth",
}


def _images(count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.eval()(images)


# --- the registry ----------------------------------------------------------------------------------------------

def test_list_pretrained_lists_every_published_file() -> None:
    assert sorted(timm.list_pretrained("*vig*")) == sorted(PUBLISHED)


@pytest.mark.parametrize("tag", sorted(PUBLISHED))
def test_each_tag_names_its_source_and_the_authors_preprocessing(tag: str) -> None:
    config = get_pretrained_cfg(tag)
    assert isinstance(config, VigPretrainedCfg)
    source = config.url or f"{config.hf_hub_id}/{config.hf_hub_filename}"
    assert source.endswith("/" + PUBLISHED[tag]) or source.endswith("/" + PUBLISHED[tag].replace(" ", "%20"))
    assert config.paper_ids and config.paper_name and config.origin_url
    assert config.interpolation == "bicubic" and config.input_size == (3, 224, 224)
    family = tag.split("_")[0]
    if family in ("vig", "svig", "pvig"):
        assert config.mean == config.std == (0.5, 0.5, 0.5) and config.license in ("apache-2.0", "gpl-3.0")
        assert config.crop_pct == (0.95 if tag.startswith("pvig_b") else 0.9)
    else:
        assert config.mean == (0.485, 0.456, 0.406) and config.crop_pct == 0.9
    assert config.num_classes == (0 if tag.endswith("in21k") else 1000)
    assert (config.top1 is None) == tag.endswith("in21k")


@pytest.mark.parametrize("start, dec, ema", [(s, d, e) for s, d, _, e, _ in SVIG_CHECKPOINTS])
def test_an_svig_tag_builds_its_threshold_schedule(start: float, dec: float, ema: bool) -> None:
    name = f"svig_ti_224_gelu.{svig_tag(start, dec)}"
    model = timm.create_model(name, img_size=32)
    thresholds = [block[0].graph_conv.threshold for block in model.backbone]
    assert thresholds == pytest.approx([start - i * dec for i in range(12)])
    assert model.pretrained_cfg["use_ema"] is ema
    given = timm.create_model(name, img_size=32, start_thresh=0.5, dec=0.01)  # the caller's schedule wins
    assert [block[0].graph_conv.threshold for block in given.backbone] == pytest.approx(
        [0.5 - i * 0.01 for i in range(12)])


def test_a_model_without_published_weights_refuses_pretrained_in_one_line() -> None:
    with pytest.raises(ValueError) as caught:
        timm.create_model("vig_ti_cifar", pretrained=True)
    assert "\n" not in str(caught.value) and "pretrained_cfg_overlay=dict(file=PATH)" in str(caught.value)


# --- the URL path: a loopback server ---------------------------------------------------------------------------

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:  # the test's output stays the test's
        pass


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh torch hub cache; loopback requests bypass any proxy."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return home


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(folder, base URL) of an HTTP server on 127.0.0.1 serving the folder from a thread."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = lambda *args: _Quiet(*args, directory=str(folder))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _bare_vig(path: Path) -> Path:
    """The ViG release layout (a bare state dict) of the fixture's weights."""
    weights, _ = extract_state_dict(read_checkpoint(shared_path("fixtures", "svig_ti_checkpoint.pth.tar")))
    torch.save(weights, path)
    return path


# tag, the fixture in that tag's published layout, load by hand with EMA, the published code's float64 logits
URL_CASES = [
    ("vig_ti_224_gelu.in1k", "bare ViG", False, ("vig_ti_reference_outputs.pt", "knn", "logits")),
    ("svig_ti_224_gelu.in1k_t089_d003", "svig_ti_checkpoint.pth.tar", False,
     ("vig_ti_reference_outputs.pt", "svig", 0)),
    ("svig_ti_224_gelu.in1k_t093_d003", "svig_ti_checkpoint.pth.tar", True, None),
    ("pvig_ti_224_gelu.in1k", "pvig_ti_checkpoint.pth.tar", False, ("pvig_ti_reference_outputs.pt", "logits", None)),
]


@pytest.mark.parametrize("tag, fixture, ema, reference", URL_CASES, ids=[case[0] for case in URL_CASES])
def test_pretrained_true_downloads_the_published_layout(tag: str, fixture: str, ema: bool, reference: Any,
                                                        server: tuple[Path, str], torch_home: Path) -> None:
    folder, base = server
    name = get_pretrained_cfg(tag).url.rsplit("/", 1)[-1]
    served = folder / name
    if fixture == "bare ViG":
        _bare_vig(served)
    else:
        shutil.copy(shared_path("fixtures", fixture), served)
    model = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=base + name))
    assert (torch_home / "hub" / "checkpoints" / name).is_file()  # timm's download went through the torch hub cache
    by_hand = timm.create_model(tag)
    load_checkpoint(by_hand, served, use_ema=ema)
    images = _images()
    assert torch.equal(_logits(model, images), _logits(by_hand, images))
    if reference is not None:
        outputs = torch.load(shared_path("fixtures", reference[0]))
        entry = outputs[reference[1]]
        expected = entry[reference[2]] if reference[2] is not None else entry
        expected = expected["logits_ema" if ema else "logits"] if isinstance(expected, dict) else expected
        torch.testing.assert_close(_logits(model.double(), outputs["input"].double()), expected, rtol=1e-9, atol=1e-9)


def test_a_cached_download_loads_with_the_server_gone(server: tuple[Path, str], torch_home: Path) -> None:
    folder, base = server
    path = _bare_vig(folder / "vig_ti_74.5.pth")
    url = base + path.name
    first = timm.create_model("vig_ti_224_gelu.in1k", pretrained=True, pretrained_cfg_overlay=dict(url=url))
    path.unlink()  # the address now answers 404: only the cache has the file
    again = timm.create_model("vig_ti_224_gelu.in1k", pretrained=True, pretrained_cfg_overlay=dict(url=url))
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_without_network_the_error_is_one_line_naming_the_url_and_a_local_file(torch_home: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/pvig_ti_78.5.pth.tar"
    with pytest.raises(WeightsUnavailableError) as caught:
        timm.create_model("pvig_ti_224_gelu", pretrained=True, pretrained_cfg_overlay=dict(url=url))
    message = str(caught.value)
    assert "\n" not in message and url in message and "pretrained_cfg_overlay=dict(file=PATH)" in message


def test_a_local_copy_loads_the_entry_its_tag_names(tmp_path: Path) -> None:
    """``pretrained_cfg_overlay=dict(file=...)`` keeps working, and takes the tag's entry (timm's own file reader
    would take state_dict_ema for every tag)."""
    path = shared_path("fixtures", "svig_ti_checkpoint.pth.tar")
    for tag, ema in (("in1k_t089_d003", False), ("in1k_t093_d003", True)):
        model = timm.create_model(f"svig_ti_224_gelu.{tag}", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        by_hand = timm.create_model(f"svig_ti_224_gelu.{tag}")
        load_checkpoint(by_hand, path, use_ema=ema)
        assert torch.equal(model.prediction[4].weight, by_hand.prediction[4].weight), tag
        assert model.pretrained_cfg["file"] == str(path) and model.pretrained_cfg["state_dict"] is None


def test_the_in21k_tag_is_a_headless_backbone(server: tuple[Path, str], torch_home: Path) -> None:
    """The ImageNet-21k pyramid ViG-M's classifier size is unpublished: its tag drops the file's classifier
    (num_classes 0), and a class count builds a fresh head over the loaded backbone. (The tag's config on the
    Ti architecture, with the Ti fixture, keeps the test small.)"""
    folder, base = server
    weights = read_checkpoint(shared_path("fixtures", "pvig_ti_checkpoint.pth.tar"))
    weights["prediction.4.weight"] = torch.randn(21841, 1024, 1, 1)  # a head of some other class count
    weights["prediction.4.bias"] = torch.zeros(21841)
    torch.save(weights, folder / "pvig_m_im21k_90e.pth")
    options = dict(pretrained=True, pretrained_cfg=get_pretrained_cfg("pvig_m_224_gelu.in21k"),
                   pretrained_cfg_overlay=dict(url=base + "pvig_m_im21k_90e.pth"))
    headless = timm.create_model("pvig_ti_224_gelu", **options)
    assert headless.num_classes == 0 and _logits(headless, _images(1)).shape == (1, 1024)
    assert torch.equal(headless.prediction[0].weight, weights["prediction.0.weight"])
    tuned = timm.create_model("pvig_ti_224_gelu", num_classes=5, **options)
    assert tuned.prediction[4].weight.shape[0] == 5
    assert torch.equal(tuned.stem.convs[0].weight, weights["stem.convs.0.weight"])


# --- the Hugging Face path: an offline hub cache ---------------------------------------------------------------

_HUB_WORKER = """
import json, sys, torch, timm, vig.models
from vig.errors import WeightsUnavailableError
images, out, names = torch.load(sys.argv[1]), sys.argv[2], sys.argv[3:]
results, outputs = {}, {}
for name in names:
    try:
        model = timm.create_model(name, pretrained=True).eval().double()
    except WeightsUnavailableError as err:
        results[name] = str(err)
        continue
    results[name] = None
    with torch.no_grad():
        outputs[name] = model(images.double())
torch.save(outputs, out)
print(json.dumps(results))
"""


def _hub_cache(home: Path, repo: str, filename: str, source: Path) -> None:
    """``source`` as huggingface_hub caches ``repo``'s ``filename``: hub/models--org--name/{blobs/<sha256>,
    refs/main (the revision), snapshots/<revision>/<filename> -> ../../blobs/<sha256>}."""
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    revision = hashlib.sha1(digest.encode()).hexdigest()
    (folder / "blobs").mkdir(parents=True)
    shutil.copy(source, folder / "blobs" / digest)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / filename).symlink_to(os.path.relpath(folder / "blobs" / digest, snapshot))


def _run_hub_worker(tmp_path: Path, home: Path, names: list[str], images: torch.Tensor) -> tuple[dict, dict]:
    """Create each of ``names`` with pretrained=True in a fresh process reading only the offline hub cache
    ``home``: ({name: the one-line error or None}, {name: float64 logits of ``images``})."""
    torch.save(images, tmp_path / "images.pt")
    out = tmp_path / "out.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "OMP_NUM_THREADS": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", _HUB_WORKER, str(tmp_path / "images.pt"), str(out), *names],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), torch.load(out)


def _training_checkpoint(path: Path) -> Path:
    """A MobileViG-S file in the layout of the authors' training script (``main.py``): ``state_dict`` (what their
    ``--resume ... --eval`` evaluates), ``state_dict_ema`` (different here, so that taking it would show: timm's
    own file reader prefers it), optimizer and scheduler state, epoch, scaler and the flags."""
    torch.manual_seed(3)
    weights = timm.create_model("mobilevig_s").state_dict()
    ema = {key: value + 1 if value.is_floating_point() else value for key, value in weights.items()}
    torch.save({"state_dict": weights, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {},
                "epoch": 299, "state_dict_ema": ema, "scaler": {}, "args": argparse.Namespace(model="mobilevig_s")},
               path)
    return path


@pytest.mark.parametrize("name, uncached", [("greedyvig_s.in1k", "greedyvig_m.in1k"),
                                             ("mobilevig_s.in1k", "mobilevig_b.in1k")])
def test_hub_weights_load_from_an_offline_hub_cache(name: str, uncached: str, tmp_path: Path) -> None:
    """The cached file loads (logits as loaded by hand, and for GreedyViG-S as the published code gives); a tag
    whose file is not in the cache fails in one line naming the hub file and how to pass a local copy."""
    config = get_pretrained_cfg(name)
    if name.startswith("greedyvig"):
        source = shared_path("fixtures", "greedyvig_s_checkpoint.pth")
        reference = torch.load(shared_path("fixtures", "greedyvig_s_reference_outputs.pt"))
        images = reference["input"][:2]
    else:
        source, reference, images = _training_checkpoint(tmp_path / "mobilevig.pth.tar"), None, _images()
    home = tmp_path / "hf_home"
    _hub_cache(home, config.hf_hub_id, config.hf_hub_filename, source)
    errors, logits = _run_hub_worker(tmp_path, home, [name, uncached], images)
    assert errors[name] is None
    by_hand = timm.create_model(name)
    load_checkpoint(by_hand, source)
    assert torch.equal(logits[name], _logits(by_hand.double(), images.double()))
    if reference is not None:
        torch.testing.assert_close(logits[name], reference["logits"][:2], rtol=0, atol=0)
    missing = get_pretrained_cfg(uncached)
    message = errors[uncached]
    assert message and "\n" not in message and "pretrained_cfg_overlay=dict(file=PATH)" in message
    assert f"huggingface.co/{missing.hf_hub_id}/blob/main/{missing.hf_hub_filename}" in message
    reason = message.split(" (", 1)[1].rsplit("); without a network", 1)[0]
    # quoted in whole sentences: huggingface_hub's long second sentence was cut at 200 characters ("make sure your")
    assert "make sure your" not in reason and not reason.endswith(" "), reason


# --- train.py and the tools ------------------------------------------------------------------------------------

@pytest.fixture
def cached_vig_ti(torch_home: Path) -> Path:
    """The torch hub cache holding vig_ti_224_gelu.in1k's file, as after one download."""
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return _bare_vig(folder / "vig_ti_74.5.pth")


@pytest.mark.usefixtures("fast_in_process_runs")
@pytest.mark.parametrize("tag, ema", [("vig_ti_224_gelu", False), ("svig_ti_224_gelu.in1k_t093_d003", True)])
def test_train_evaluate_pretrained_runs_offline_from_the_torch_hub_cache(
        tag: str, ema: bool, tmp_path: Path, torch_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--evaluate --pretrained, no --pretrain_path: the tag's file from the torch hub cache, its 1000-class head,
    its preprocessing (224 px) and, for an EMA tag, its EMA weights (the loss tells the entries apart)."""
    config = get_pretrained_cfg(tag)
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    cached = torch_home / "hub" / "checkpoints" / config.url.rsplit("/", 1)[-1]
    if ema:
        shutil.copy(shared_path("fixtures", "svig_ti_checkpoint.pth.tar"), cached)
    else:
        _bare_vig(cached)
    data = make_image_folder(tmp_path / "data", {"val": {"a": 2, "b": 1}}, size=40)
    capsys.readouterr()
    assert train.main([str(data), "--model", tag, "--pretrained", "--evaluate", "-j", "0", "-b", "3"]) == 0
    result = last_json_line(capsys.readouterr().out)
    assert (result["num_classes"], result["img_size"], result["count"]) == (1000, 224, 3)
    assert (result["checkpoint"], result["ema"]) == (config.url, ema)
    # the same file by hand (the SViG fixture records vig_ti_224_gelu with its own thresholds: the tag's win)
    by_file = [str(data), "--pretrain_path", str(cached), "--evaluate", "-j", "0", "-b", "3",
               *(["--model-ema", "--start-thresh", "0.93", "--dec", "0.03"] if ema else ["--model", tag])]
    assert train.main(by_file) == 0
    assert last_json_line(capsys.readouterr().out)["loss"] == result["loss"]


def test_train_pretrained_fine_tunes_with_a_reset_head(cached_vig_ti: Path) -> None:
    """--pretrained: the published weights, a fresh head where the class count differs (as timm does)."""
    published = read_checkpoint(cached_vig_ti)
    model = build_model(ModelSection(model="vig_ti_224_gelu", pretrained=True), 3)
    for key, value in model.state_dict().items():
        if key.startswith("prediction.4."):
            assert value.shape[0] == 3
        else:
            assert torch.equal(value, published[key]), key


@pytest.mark.usefixtures("fast_in_process_runs")
def test_train_pretrained_without_network_is_one_line_naming_pretrained_path(
        tmp_path: Path, torch_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "data", {"val": {"a": 1}}, size=40)
    port = _closed_port()
    assert train.main([str(data), "--model", "vig_ti_224_gelu", "--pretrained", "--evaluate", "-j", "0",
                       "--model-kwargs", f"pretrained_cfg_overlay={{'url': 'http://127.0.0.1:{port}/x.pth'}}"]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}/x.pth" in lines[0] and "--pretrained-path PATH" in lines[0]


@pytest.mark.usefixtures("fast_in_process_runs")
@pytest.mark.parametrize("model, message", [("vig_ti_cifar", "vig_ti_cifar has no published weights"),
                                            ("pvig_m_224_gelu.in21k", "have no classifier")])
def test_train_evaluate_pretrained_without_a_published_head_is_one_line(
        model: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "data", {"val": {"a": 1}}, size=40)
    assert train.main([str(data), "--model", model, "--pretrained", "--evaluate", "-j", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_vig_macs_takes_pretrained(cached_vig_ti: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert macs_main(["vig_ti_224_gelu", "--pretrained"]) == 0
    assert "vig_ti_224_gelu" in capsys.readouterr().out


def test_vig_visualize_takes_pretrained(cached_vig_ti: Path, tmp_path: Path) -> None:
    image = next(iter(sorted((make_image_folder(tmp_path / "img", {"x": {"a": 1}}, size=64) / "x" / "a").iterdir())))
    out = tmp_path / "graph.png"
    assert visualize_main(["--model", "vig_ti_224_gelu", "--pretrained", "--image", str(image), "--out",
                           str(out), "--blocks", "0"]) == 0
    assert out.is_file()
