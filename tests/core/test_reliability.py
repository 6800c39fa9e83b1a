"""Saving and loading never lose, corrupt or execute (docs/reliability.md): each case of issue 11, reproduced."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import splice
from splice.core.errors import CheckpointError, ConfigError

TINY = "vit-gpt2-tiny"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vit-gpt2-tiny.yaml"


@pytest.fixture(scope="module")
def pair():
    return splice.compose(TINY, seed=0), splice.compose(TINY, seed=1)


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _saved_then_edited(model, folder: Path, edit) -> Path:
    """Save ``model`` to ``folder``, then change its splice.json by hand through ``edit(config)``."""
    model.save_pretrained(folder)
    cfg = json.loads((folder / "splice.json").read_text())
    edit(cfg)
    (folder / "splice.json").write_text(json.dumps(cfg))
    return folder


# -- a save never deletes what it did not write ------------------------------------------------------------


def test_build_into_a_folder_with_user_files_is_refused(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("notes")
    cli = Path(sys.executable).with_name("splice")
    run = subprocess.run([str(cli), "build", str(EXAMPLE), "--out", str(proj)], capture_output=True, text=True)
    assert run.returncode != 0
    assert "notes.txt" in run.stderr and "fix:" in run.stderr and "Traceback" not in run.stderr
    assert (proj / "notes.txt").read_text() == "notes"
    assert sorted(p.name for p in proj.iterdir()) == ["notes.txt"]


def test_save_over_a_checkpoint_holding_user_files_keeps_both(pair, tmp_path):
    a, b = pair
    a.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        b.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    assert _same(splice.load(tmp_path / "m"), a)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data").mkdir()
    with pytest.raises(CheckpointError, match="data/"):
        a.save_pretrained(tmp_path / "sub")
    with pytest.raises(CheckpointError, match="notes.txt"):
        splice.export_transformers(a, tmp_path / "m")


def test_save_into_an_empty_folder_and_over_its_own_checkpoint(pair, tmp_path):
    a, b = pair
    (tmp_path / "m").mkdir()
    a.save_pretrained(tmp_path / "m")
    b.save_pretrained(tmp_path / "m")
    assert _same(splice.load(tmp_path / "m"), b)
    splice.export_transformers(a, tmp_path / "hf")
    splice.export_transformers(b, tmp_path / "hf")  # an export replaces an export
    assert _hidden(tmp_path) == []


def test_a_file_at_the_target_is_refused(pair, tmp_path):
    (tmp_path / "m").write_text("a file")
    with pytest.raises(CheckpointError, match="not a folder"):
        pair[0].save_pretrained(tmp_path / "m")
    assert (tmp_path / "m").read_text() == "a file"


# -- data cannot name code or paths ----------------------------------------------------------------------


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


def _plant(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"state_dict": _Marker(str(marker))}))
    return evil, marker


def test_timm_kwargs_cannot_name_a_checkpoint_or_a_factory(tmp_path):
    evil, marker = _plant(tmp_path)
    for kwargs, bad in (({"checkpoint_path": str(evil)}, "checkpoint_path"),
                        ({"pretrained_cfg_overlay": {"file": str(evil)}}, "pretrained_cfg_overlay"),
                        ({"act_layer": "nope"}, "act_layer"), ({"features_only": True}, "features_only"),
                        ({"global_pool": "os.system"}, "global_pool")):
        spec = {"encoder": {"name": "timm", "config": {"model": "convnext_atto", "img_size": 32,
                                                        "kwargs": {"depths": [1, 1, 1, 1], **kwargs}}},
                "decoder": {"name": "gpt2", "config": {"vocab_size": 99, "n_positions": 32, "n_embd": 32,
                                                       "n_layer": 1, "n_head": 4}}}
        plan = splice.validate(spec)
        assert not plan.ok
        assert any(p.path.startswith("encoder.config.kwargs") and bad in p.message for p in plan.problems), plan.problems
    assert not marker.exists()


def test_a_saved_folder_naming_a_pickle_is_refused_before_anything_runs(pair, tmp_path):
    evil, marker = _plant(tmp_path)
    model = splice.compose({"encoder": {"name": "timm", "config": {"model": "convnext_atto", "img_size": 32,
                                                                  "kwargs": {"depths": [1, 1, 1, 1]}}},
                            "decoder": {"name": "gpt2", "config": {"vocab_size": 99, "n_positions": 32, "n_embd": 32,
                                                                   "n_layer": 1, "n_head": 4}}}, seed=0)
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "splice.json").read_text())
    cfg["spec"]["encoder"]["config"]["kwargs"]["checkpoint_path"] = str(evil)
    (tmp_path / "m" / "splice.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="checkpoint_path"):
        splice.load(tmp_path / "m")
    assert not marker.exists()


@pytest.mark.parametrize("spec", ["vit-gpt2-tiny", str(EXAMPLE)])
def test_a_saved_spec_must_be_the_resolved_spec_not_a_reference(pair, tmp_path, spec):
    _saved_then_edited(pair[0], tmp_path / "m", lambda cfg: cfg.update(spec=spec))
    with pytest.raises(CheckpointError, match="resolved spec"):
        splice.load(tmp_path / "m")


def test_a_saved_spec_cannot_name_pretrained_weights_elsewhere(pair, tmp_path):
    pair[1].save_pretrained(tmp_path / "other")
    elsewhere = str(tmp_path / "other")
    _saved_then_edited(pair[0], tmp_path / "m", lambda cfg: cfg["spec"]["decoder"].update(pretrained=elsewhere))
    with pytest.raises(CheckpointError, match="pretrained"):
        splice.load(tmp_path / "m")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/x.safetensors"])
def test_a_shard_index_cannot_reach_outside_the_folder(pair, tmp_path, shard):
    from safetensors.torch import save_file

    splice.export_transformers(pair[0], tmp_path / "hf")
    folder = tmp_path / "hf"
    tensors = splice.core.checkpoint.read_weights(folder)
    save_file(tensors, tmp_path / "outside.safetensors")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in tensors}}))
    with pytest.raises(CheckpointError, match="not a file inside"):
        splice.load(folder)


# -- strict loading is strict ----------------------------------------------------------------------------


def test_editing_the_saved_layers_cannot_drop_trained_tensors(pair, tmp_path):
    _saved_then_edited(pair[0], tmp_path / "m", lambda cfg: cfg["spec"]["cross_attention"].update(layers=[0]))
    with pytest.raises(CheckpointError, match=r"unexpected \(10\).*decoder\.h\.1\.crossattention"):
        splice.load(tmp_path / "m", verify=False)
    loose = splice.load(tmp_path / "m", strict=False, verify=False)
    assert len(loose.loading_report.unexpected) == 10
    assert "decoder.h.1.crossattention" in str(loose.loading_report)


def test_a_transformers_folder_with_more_layers_than_its_config(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from oracle import tiny_ved

    hf = tiny_ved()
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["decoder"]["n_layer"] = 1
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"no place in the model.*decoder\.transformer\.h\.1\."):
        splice.load(tmp_path / "hf")
    loose = splice.load(tmp_path / "hf", strict=False)
    assert any(n.startswith("decoder.transformer.h.1.") for n in loose.loading_report.unexpected)
    assert all("pooler" in n for n in loose.loading_report.unused)  # the expected extras stay "unused"


def test_a_tied_alias_cannot_overwrite_a_tensor(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    pair[0].save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    tensors = load_file(f)
    save_file(tensors, f, metadata={"format": "splice", "version": "2",
                                    "tied": json.dumps({"decoder.ln_f.weight": "decoder.ln_f.bias"})})
    _rerecord(tmp_path / "m")
    with pytest.raises(CheckpointError, match="holds a tensor 'decoder.ln_f.weight' of its own"):
        splice.load(tmp_path / "m")


@pytest.mark.parametrize("version", [999, "2", None, 0, True])
def test_unknown_format_versions_are_refused(pair, tmp_path, version):
    _saved_then_edited(pair[0], tmp_path / "m", lambda cfg: cfg.update(version=version))
    with pytest.raises(CheckpointError, match="format version"):
        splice.load(tmp_path / "m")


def test_a_version_1_folder_still_loads(pair, tmp_path):
    """Folders saved before checksums: no record to verify, everything else checked as before."""
    from safetensors.torch import load_file, save_file

    _saved_then_edited(pair[0], tmp_path / "m", lambda cfg: (cfg.update(version=1), cfg.pop("files")))
    f = tmp_path / "m" / "model.safetensors"
    save_file(load_file(f), f, metadata={"format": "splice", "version": "1", "tied": "{}"})
    assert _same(splice.load(tmp_path / "m"), pair[0])


def _rerecord(folder: Path) -> None:
    """Record the folder's files anew in splice.json, as if it had been saved this way."""
    from splice.core.files import describe_files

    cfg = json.loads((folder / "splice.json").read_text())
    cfg["files"] = {k: v for k, v in describe_files(folder).items() if k != "splice.json"}
    (folder / "splice.json").write_text(json.dumps(cfg))


# -- corruption: checksums and non-finite weights --------------------------------------------------------


def test_flipped_bytes_anywhere_are_caught(pair, tmp_path):
    """Every saved file, bytes flipped at random places: each load fails with a CheckpointError naming the
    file, or (never, with the checksums) loads different numbers."""
    pair[0].save_pretrained(tmp_path / "m")
    rng = random.Random(0)
    base = tmp_path / "m"
    cases = caught = 0
    for name in ("model.safetensors", "tokenizer.json", "generation.json", "preprocessor_config.json"):
        path = base / name
        if not path.is_file():
            continue
        original = path.read_bytes()
        for _ in range(12 if name == "model.safetensors" else 3):
            data = bytearray(original)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(data))
            cases += 1
            with pytest.raises(CheckpointError, match=name):
                splice.load(base)
            caught += 1
        path.write_bytes(original)
    assert cases == caught and cases >= 12


def test_nan_and_inf_weights_are_reported(pair, tmp_path):
    model = splice.compose(TINY, seed=0)
    with torch.no_grad():
        model.decoder.ln_f.weight[0] = float("nan")
        model.decoder.wte.weight[1, 1] = float("inf")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="(?s)nonfinite.*decoder.ln_f.weight"):
        splice.load(tmp_path / "m")
    with pytest.warns(UserWarning, match="NaN or Inf"):
        loose = splice.load(tmp_path / "m", strict=False)
    assert loose.loading_report.nonfinite == ["decoder.ln_f.weight", "decoder.wte.weight"]


def test_verify_false_skips_only_the_hash(pair, tmp_path):
    pair[0].save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "tokenizer.json"
    if not f.is_file():
        f = tmp_path / "m" / "preprocessor_config.json"
    data = bytearray(f.read_bytes())
    data[-2] ^= 1  # same size, different bytes
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        splice.load(tmp_path / "m")
    with open(tmp_path / "m" / "preprocessor_config.json", "a") as fh:
        fh.write(" ")  # a different size is caught without the hash
    with pytest.raises(CheckpointError, match="preprocessor_config.json.*truncated or corrupted"):
        splice.load(tmp_path / "m", verify=False)


def test_a_file_added_after_the_save_is_refused(pair, tmp_path):
    pair[0].save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "generation.json").exists()
    (tmp_path / "m" / "generation.json").write_text('{"num_beams": 4}')
    with pytest.raises(CheckpointError, match="generation.json.*not recorded"):
        splice.load(tmp_path / "m")


# -- durable, clean, serialised saves --------------------------------------------------------------------


def _saver(model_a, model_b, target: Path) -> None:
    """The body of a forked child: save two models to one place, alternately, until killed."""
    os.environ["SPLICE_FAST_LINEAR"] = "0"
    torch.set_num_threads(1)
    i = 0
    while True:
        (model_a if i % 2 == 0 else model_b).save_pretrained(target)
        i += 1


def _fork(fn, *args) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            fn(*args)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def kill_trials(pair, folder: Path, trials: int, seed: int = 0) -> dict[str, int]:
    """Kill a saving process at random moments; count what the target holds afterwards."""
    a, b = pair
    a.save_pretrained(folder)
    rng = random.Random(seed)
    counts = {"old or new": 0, "other": 0, "leftovers after kill": 0, "leftovers after next save": 0}
    for _ in range(trials):
        pid = _fork(_saver, a, b, folder)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        loaded = splice.load(folder)
        counts["old or new" if _same(loaded, a) or _same(loaded, b) else "other"] += 1
        counts["leftovers after kill"] += bool([n for n in _hidden(folder.parent) if "splice-tmp" in n])
        a.save_pretrained(folder)
        counts["leftovers after next save"] += bool(_hidden(folder.parent))
    return counts


def test_kill_9_during_saves_leaves_a_whole_checkpoint_and_the_next_save_cleans_up(pair, tmp_path):
    counts = kill_trials(pair, tmp_path / "m", trials=8)
    assert counts["old or new"] == 8 and counts["other"] == 0
    assert counts["leftovers after next save"] == 0


@pytest.mark.slow
def test_kill_9_trials_many(pair, tmp_path):
    counts = kill_trials(pair, tmp_path / "m", trials=100, seed=1)
    print(counts)
    assert counts["old or new"] == 100 and counts["leftovers after next save"] == 0


def test_the_target_always_holds_a_checkpoint_while_saves_replace_it(pair, tmp_path):
    folder = tmp_path / "m"
    pair[0].save_pretrained(folder)
    pid = _fork(_saver, *pair, folder)
    try:
        seen, gaps, deadline = 0, 0, time.monotonic() + 1.5
        while time.monotonic() < deadline:
            gaps += not (folder / "splice.json").is_file()
            seen += 1
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert seen > 1000 and gaps == 0


def _save_n(model, target: Path, n: int) -> None:
    os.environ["SPLICE_FAST_LINEAR"] = "0"
    torch.set_num_threads(1)
    for _ in range(n):
        model.save_pretrained(target)


def test_concurrent_saves_to_one_path_are_serialised(pair, tmp_path):
    folder = tmp_path / "m"
    pids = [_fork(_save_n, model, folder, 6) for model in pair]
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [0, 0]
    loaded = splice.load(folder)
    assert _same(loaded, pair[0]) or _same(loaded, pair[1])
    assert _hidden(tmp_path) == []


def _save_limited(model, target: Path, limit: int) -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        model.save_pretrained(target)
    except CheckpointError as exc:
        print(exc, file=sys.stderr)
        os._exit(3)


def test_a_save_that_cannot_write_reports_it_and_keeps_the_old_checkpoint(pair, tmp_path):
    folder = tmp_path / "m"
    pair[0].save_pretrained(folder)
    pid = _fork(_save_limited, pair[1], folder, 50_000)  # the weights file is ~440 KB
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3
    assert _same(splice.load(folder), pair[0])
    assert _hidden(tmp_path) == []


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_a_checkpoint_error_and_the_old_checkpoint_stays(pair, tmpfs):
    pair[0].save_pretrained(tmpfs / "m")  # ~440 KB of a 600 KB disk: a second copy does not fit
    with pytest.raises(CheckpointError, match="disk is full"):
        pair[1].save_pretrained(tmpfs / "m")
    assert _same(splice.load(tmpfs / "m"), pair[0])
    assert _hidden(tmpfs) == []


def test_a_read_only_file_system_is_a_checkpoint_error(pair, tmpfs):
    pair[0].save_pretrained(tmpfs / "m")
    assert subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)]).returncode == 0
    with pytest.raises(CheckpointError, match="read-only"):
        pair[1].save_pretrained(tmpfs / "m")
    assert _same(splice.load(tmpfs / "m"), pair[0])


def _save_as_nobody(model, target: Path) -> None:
    os.setgid(65534)
    os.setuid(65534)
    try:
        model.save_pretrained(target)
    except CheckpointError as exc:
        print(exc, file=sys.stderr)
        os._exit(3 if "permission denied" in str(exc) else 4)


def test_a_folder_without_write_permission_is_a_checkpoint_error(pair):
    parent = Path(tempfile.mkdtemp())
    try:
        parent.chmod(0o755)
        pair[0].save_pretrained(parent / "m")
        if os.geteuid() == 0:  # root writes anywhere: try as nobody
            pid = _fork(_save_as_nobody, pair[1], parent / "m")
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3
        else:
            parent.chmod(0o555)
            with pytest.raises(CheckpointError, match="permission denied"):
                pair[1].save_pretrained(parent / "m")
            parent.chmod(0o755)
        assert _same(splice.load(parent / "m"), pair[0])
    finally:
        shutil.rmtree(parent, ignore_errors=True)
