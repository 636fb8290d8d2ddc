"""Uploaded models (vislib.uploads): safe reading (a pickle that would run code is refused and never
runs), labels files, the model built from the file equals the library's own load, clear errors for
files that do not fit, per-session names and ids, and the server's accounting of held bytes."""

from __future__ import annotations

import gc
import io
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

import vislib
from vislib import uploads
from vislib.errors import ModelError, WeightsError

ARCH = "shapes_resnet"  # small, offline: a teacher's net of the kind this is for


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """A state dict of the bundled architecture with weights of its own (not the bundled ones)."""
    torch.manual_seed(7)
    model = vislib.load_model(ARCH, weights=None, device="cpu").model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def pt_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class Exploit:
    """A pickle payload: unpickling it calls ``os.system`` (it must never be built)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------------------------------
# Reading files


def test_safetensors_and_pt_read_back_exactly(state):
    for data, name in ((save_safetensors(state), "w.safetensors"), (pt_bytes(state), "w.pt"),
                       (pt_bytes({"state_dict": state}), "w.pth")):
        read = uploads.read_weights(data, name)
        assert read.keys() == state.keys()
        assert all(torch.equal(read[k], state[k]) for k in state), name


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, state):
    marker = tmp_path / "pwned"
    data = pt_bytes({**state, "extra": Exploit(marker)})
    with pytest.raises(WeightsError) as info:
        uploads.read_weights(data, "evil.pt")
    message = str(info.value)
    assert "evil.pt" in message and "refused without running it" in message
    assert f"({os.system.__module__}.system)" in message  # the global as module.name, e.g. posix.system
    assert ".safetensors" in message  # says what to upload instead
    assert not marker.exists()
    with pytest.raises(WeightsError):  # the whole upload path refuses it too, before building anything
        uploads.build_upload(ARCH, data, "evil.pt")
    assert not marker.exists()
    # torch.save(model) pickles the module's class: refused the same way, nothing imported or run
    model = vislib.load_model(ARCH, weights=None, device="cpu").model
    with pytest.raises(WeightsError, match="refused without running it"):
        uploads.read_weights(pt_bytes(model), "whole_model.pt")


def test_files_that_are_not_state_dicts():
    with pytest.raises(WeightsError, match="upload a .safetensors file"):
        uploads.read_weights(b"x", "weights.h5")
    with pytest.raises(WeightsError, match="not a PyTorch file"):
        uploads.read_weights(b"hello, not a zip", "w.pt")
    with pytest.raises(WeightsError, match="not a readable .safetensors"):
        uploads.read_weights(b"\x00" * 64, "w.safetensors")
    with pytest.raises(WeightsError, match="expected a state dict"):
        uploads.read_weights(pt_bytes([torch.zeros(2)]), "w.pt")


def test_the_size_cap(monkeypatch, state):
    data = save_safetensors(state)
    monkeypatch.setattr(uploads, "MAX_MODEL_MB", 0.1)
    with pytest.raises(WeightsError, match=r"the limit is 0.1 MB"):
        uploads.read_weights(data, "w.safetensors")
    with pytest.raises(vislib.VislibError, match="20 MB"):
        uploads.check_image_size(20 * uploads.MB + 1)
    uploads.check_image_size(20 * uploads.MB)


def test_labels_files():
    assert uploads.read_labels(b"cat\n\n dog \r\nbird\n", "l.txt") == ["cat", "dog", "bird"]
    assert uploads.read_labels(json.dumps(["a", "b"]).encode(), "l.json") == ["a", "b"]
    assert uploads.read_labels(json.dumps({"1": "b", "0": "a"}).encode(), "l.json") == ["a", "b"]
    for data, name, match in ((b"{", "l.json", "not valid JSON"), (b'{"0": "a", "2": "c"}', "l.json", "0…1"),
                              (b'[1, 2]', "l.json", "list of labels"), (b"\n \n", "l.txt", "non-empty"),
                              (b"\xff\xfe\x00", "l.txt", "UTF-8")):
        with pytest.raises(ModelError, match=match):
            uploads.read_labels(data, name)


# --------------------------------------------------------------------------------------------------
# Building


def test_the_uploaded_model_is_the_library_load_of_the_same_file(tmp_path, state):
    data = save_safetensors(state)
    path = tmp_path / "mine.safetensors"
    path.write_bytes(data)
    direct = vislib.load_model(ARCH, weights=path, device="cpu")
    up = uploads.build_upload(ARCH, data, "mine.safetensors", session_id="s1", device="cpu")
    bundle = up.bundle
    x = torch.randn(2, *bundle.input_shape)
    with torch.no_grad():
        assert torch.equal(bundle.logits(x), direct.logits(x))
    assert bundle.layers == direct.layers and bundle.default_layer == direct.default_layer
    assert bundle.name == "upload:mine" and bundle.source == "upload" and bundle.upload_architecture == ARCH
    assert bundle.weights == f"mine.safetensors (upload {uploads.upload_id('s1', up.digest)})"
    assert up.nbytes == sum(t.numel() * t.element_size() for t in state.values())
    assert not list(tmp_path.parent.glob("vislib-upload-*"))  # the private copy is gone


def test_labels_from_the_file_and_a_count_that_does_not_fit(state):
    data = pt_bytes(state)
    classes = len(vislib.load_model(ARCH, weights=None, device="cpu").labels)
    names = [f"kind {i}" for i in range(classes)]
    up = uploads.build_upload(ARCH, data, "w.pt", labels="\n".join(names).encode(), labels_file="names.txt")
    assert up.bundle.labels == names and "names.txt" in up.bundle.labels_from
    with pytest.raises(ModelError, match=rf"names.txt: {classes + 1} labels, but w.pt gives {ARCH} {classes} "):
        uploads.build_upload(ARCH, data, "w.pt", labels="\n".join([*names, "extra"]).encode(),
                             labels_file="names.txt")


def test_keys_that_do_not_fit_name_the_keys(state):
    renamed = {("module." + k): v for k, v in state.items()}
    with pytest.raises(WeightsError) as info:
        uploads.build_upload(ARCH, save_safetensors(renamed), "dp.safetensors")
    message = str(info.value)
    assert message.startswith(f"dp.safetensors on {ARCH}:") and "missing keys" in message
    assert "module." in message and "vislib-upload" not in message and "/tmp" not in message


def test_the_number_of_classes_comes_from_the_file(state):
    """A head with 5 classes instead of the architecture's 8: the model is built with 5."""
    head = [k for k, v in state.items() if v.dim() == 2][-1]
    bias = head.replace("weight", "bias")
    small = {**state, head: state[head][:5].clone(), bias: state[bias][:5].clone()}
    up = uploads.build_upload(ARCH, save_safetensors(small), "five.safetensors",
                              labels=b"a\nb\nc\nd\ne", labels_file="five.txt")
    assert up.bundle.labels == list("abcde")
    x = torch.randn(1, *up.bundle.input_shape)
    with torch.no_grad():
        assert up.bundle.logits(x).shape == (1, 5)
    assert any("5" in note for note in up.bundle.notes)


def test_architectures_the_dashboard_does_not_take():
    with pytest.raises(ModelError, match="Python code"):
        uploads.build_upload("os.path:join", b"", "w.safetensors")
    with pytest.raises(ModelError):
        uploads.build_upload("upload:other", b"", "w.safetensors")


# --------------------------------------------------------------------------------------------------
# Sessions and the server's accounting


def test_sessions_keep_their_own_models(state):
    ledger = uploads.UploadLedger(budget_mb=64)
    data = save_safetensors(state)
    a, b = uploads.SessionUploads("session-a", ledger), uploads.SessionUploads("session-b", ledger)
    first = a.add(ARCH, data, "net.safetensors")
    second = a.add(ARCH, data, "net.safetensors")
    assert (first.name, second.name) == ("upload:net", "upload:net-2") and a.names() == [first.name, second.name]
    other = b.add(ARCH, data, "net.safetensors")
    assert other.name == "upload:net" and other.bundle is not first.bundle
    assert b.get("upload:net-2") is None and "upload:net-2" not in b
    # same file, same name, other session: another weights id, so results cached by model and weights
    # cannot be found again from the other session
    assert other.bundle.weights != first.bundle.weights
    assert ledger.held_models == 3 and ledger.held_bytes == 3 * first.nbytes


def test_at_most_a_few_models_per_session(state, monkeypatch):
    monkeypatch.setattr(uploads, "MAX_PER_SESSION", 2)
    holder = uploads.SessionUploads("s", uploads.UploadLedger())
    data = save_safetensors(state)
    for name in ("one", "two", "three"):
        holder.add(ARCH, data, f"{name}.safetensors")
    assert holder.names() == ["upload:two", "upload:three"]


def test_bytes_are_released_when_the_model_is_freed(state):
    ledger = uploads.UploadLedger(budget_mb=64)
    holder = uploads.SessionUploads("s", ledger)
    up = holder.add(ARCH, save_safetensors(state), "net.safetensors")
    nbytes = up.nbytes
    assert ledger.held_bytes == nbytes
    holder.remove(up.name)
    del up
    gc.collect()
    assert ledger.held_bytes == 0 and ledger.held_models == 0


def test_the_server_budget(state):
    data = save_safetensors(state)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    ledger = uploads.UploadLedger(budget_mb=1)
    ledger.budget = int(1.5 * nbytes)  # room for one model, not two
    holder = uploads.SessionUploads("s", ledger)
    holder.add(ARCH, data, "one.safetensors")
    with pytest.raises(WeightsError, match="budget"):
        uploads.SessionUploads("t", ledger).add(ARCH, data, "two.safetensors")
    assert ledger.held_models == 1


def test_sweep_empties_sessions_gone_longer_than_the_grace(state):
    ledger = uploads.UploadLedger(budget_mb=64)
    alive = {"stay": True, "gone": False}
    stay, gone = uploads.SessionUploads("stay", ledger), uploads.SessionUploads("gone", ledger)
    data = save_safetensors(state)
    stay.add(ARCH, data, "a.safetensors")
    gone.add(ARCH, data, "b.safetensors")
    assert ledger.sweep(alive.get, grace=10, now=100.0) == []  # gone noticed at t=100
    assert ledger.sweep(alive.get, grace=10, now=105.0) == [] and len(gone) == 1  # within the grace
    assert ledger.sweep(alive.get, grace=10, now=111.0) == ["gone"]
    assert len(gone) == 0 and gone.cleared == "the browser session ended" and len(stay) == 1
    gc.collect()
    assert ledger.held_models == 1
    # a session that comes back within the grace keeps its models
    alive["stay"] = False
    ledger.sweep(alive.get, grace=10, now=200.0)
    alive["stay"] = True
    ledger.sweep(alive.get, grace=10, now=215.0)
    assert len(stay) == 1


def test_upload_names_are_safe():
    assert uploads.upload_name("../../etc/passwd") == "upload:passwd"
    assert uploads.upload_name("my net (v2).pt") == "upload:my_net_v2"
    assert uploads.upload_name("é.pt", {"upload:model"}) == "upload:model-2"
    ids = {uploads.upload_id(s, "d") for s in ("a", "b")}
    assert len(ids) == 2 and all(len(i) == 12 for i in ids)
    np.testing.assert_equal(uploads.upload_id("a", "d"), uploads.upload_id("a", "d"))


@pytest.mark.parametrize("message", [
    "Trying to load unsupported GLOBAL posix.system whose module posix is blocked.",  # torch 2.6+
    "Unsupported global: GLOBAL posix.system was not an allowed global by default.",
    "Unsupported operand: GLOBAL posix system",  # pickle's own opcode text: module, space, name
])
def test_the_refused_global_is_named_module_dot_name(message):
    assert uploads._refused_global(message) == "posix.system"
    assert uploads._refused_global("a damaged file") is None
