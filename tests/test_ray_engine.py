"""`prepare --engine ray`: the same prepared data as the local engine, from encoder actors on a local Ray cluster."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, one_line_error, run_cli, tiny_prepare_args, write_csv, write_image, write_wav


def test_import_and_help_do_not_import_ray():
    code = ("import sys; sys.argv = ['mmllm', 'prepare', '--help']\n"
            "import mmllm, mmllm.preparation, mmllm.ray_engine\nfrom mmllm.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('ray' in sys.modules, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "--engine" in r.stdout and "--ray-address" in r.stdout, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "False", r.stderr


def test_engine_ray_without_ray_says_how_to_install(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    manifest = write_csv(tmp_path / "m.csv", [{"text": "it is big", "label": "a"}, {"text": "small", "label": "b"}])
    line = one_line_error(run_cli("prepare", manifest, "--output", tmp_path / "o", "--text-model",
                                  tiny_models["text"], "--engine", "ray"))
    assert "pip install 'mmllm[ray]'" in line and "--engine ray" in line
    assert not (tmp_path / "o").exists()


def test_ray_address_only_with_engine_ray(tmp_path):
    line = one_line_error(run_cli("prepare", tmp_path / "m.csv", "--output", tmp_path / "o", "--ray-address", "auto"))
    assert "--ray-address: only used with --engine ray" in line


def bad_manifest(tmp_path, n: int = 30):
    """`n` records with text, image and audio in 3 classes, and 6 bad ones: 2 skipped while the manifest is read
    (duplicate id, empty label), 4 while decoding (missing file, garbage image, garbage audio, a folder as audio)."""
    media = tmp_path / "media"
    media.mkdir()
    rows = []
    for i in range(n):
        write_image(media / f"i{i}.png", (40 * (i % 6), 200 - 5 * i, 30 + 7 * i), size=24 + i)
        write_wav(media / f"a{i}.wav", freq=200 + 37 * i, seconds=0.3 + 0.02 * i)
        rows.append({"id": f"r{i}", "text": f"it is {['big', 'small', 'red'][i % 3]} {i}", "image": f"media/i{i}.png",
                     "audio": f"media/a{i}.wav", "label": ["x", "y", "z"][i % 3]})
    (media / "bad.png").write_bytes(b"not an image at all")
    (media / "bad.wav").write_bytes(b"RIFF garbage")
    (media / "dir.wav").mkdir()
    rows[3]["image"] = "media/missing.png"
    rows[9]["image"] = "media/bad.png"
    rows[14]["audio"] = "media/bad.wav"
    rows[20]["audio"] = "media/dir.wav"
    rows[25]["label"] = ""
    rows.append(dict(rows[7]))  # a duplicate id
    return write_csv(tmp_path / "manifest.csv", rows)


@pytest.fixture
def ray_cluster(isolated_home):
    """A local Ray cluster of 2 nodes with 1 CPU each (2 encoder actors), small object stores, no dashboard; its
    nodes inherit this test's environment, so the workers' feature cache is this test's MMLLM_HOME."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 << 20,
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=100 << 20)
    ray.init(address=cluster.address, logging_level="WARNING")
    yield ray
    ray.shutdown()
    cluster.shutdown()


def cache_keys(home) -> set[str]:
    return {p.name for p in (home / "features").rglob("*.safetensors")}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


@pytest.mark.slow  # ~40-60 s on 2 cores: Ray start and two actors loading torch + transformers
def test_ray_engine_equals_local_engine(ray_cluster, tiny_models, tmp_path, isolated_home, monkeypatch):
    from mmllm import preparation as prepare
    from mmllm.features import label_strings, load_prepared

    manifest = bad_manifest(tmp_path)
    monkeypatch.setattr(prepare, "CHUNK", 8)  # 30 records: 4 chunks, so both actors encode some
    args = [*tiny_prepare_args(tiny_models, manifest, tmp_path / "unused"), "--transcribe", "--transcribe-model",
            str(tiny_models["whisper"])]
    args = [a for a in args if a not in ("--output", str(tmp_path / "unused"))]
    r = run_cli(*args, "--output", tmp_path / "ray", "--engine", "ray")
    assert r.exit_code == 0, r.output
    assert "ray: 2 encoder actors on 2 nodes" in r.stderr and "chunks encoded by 2 of 2 actors" in r.stderr, r.stderr
    assert sum(json.loads(r.stdout)["counts"].values()) == 25  # 31 rows, 6 skipped
    ray_keys = cache_keys(isolated_home)
    local_home = tmp_path / "local_home"
    local_home.mkdir()
    monkeypatch.setenv("MMLLM_HOME", str(local_home))  # its own feature cache: nothing is read from the Ray run's
    r = run_cli(*args, "--output", tmp_path / "local")
    assert r.exit_code == 0, r.output
    assert cache_keys(local_home) == ray_keys and len(ray_keys) == 3 * 25  # image, audio, transcript per record

    got, meta = load_prepared(tmp_path / "ray")
    want, local_meta = load_prepared(tmp_path / "local")
    assert meta.pop("engine") == {"name": "ray", "actors": 2, "nodes": 2}
    assert local_meta.pop("engine") == {"name": "local"}
    assert meta == local_meta  # counts, labels, encoders, features, skipped records, transcripts report
    assert sorted((e["id"], e["column"]) for e in meta["skipped"]) == [
        ("r14", "audio"), ("r20", "audio"), ("r25", "label"), ("r3", "image"), ("r7", "id"), ("r9", "image")]
    assert set(got) == set(want)
    for split in want:
        a, b = got[split], want[split]
        assert a["id"] == b["id"] and label_strings(a) == label_strings(b)  # same records, order and labels
        for col in ("split", "text", "transcript", "input_ids", "attention_mask", "has_image", "has_audio"):
            assert a[col] == b[col], col
        for col in ("text_pooled", "image_emb", "audio_emb"):
            x, y = np.asarray(a[col], np.float32), np.asarray(b[col], np.float32)
            assert x.shape == y.shape and (cosine(x, y) >= 0.9999).all(), col

    # a worker whose mmllm (or encoders) differ from this process's: the actors refuse, in one line, nothing written
    import mmllm

    monkeypatch.setattr(mmllm, "__version__", "0.0.0+other")
    r = run_cli(*args, "--output", tmp_path / "other", "--engine", "ray")
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.output
    line = r.stderr.strip().splitlines()[-1]  # after the log lines, the one error line
    assert line.startswith("error: --engine ray: node ") and "has other encoders or mmllm than the driver (mmllm " \
        in line and "0.0.0+other" in line, line
    assert not (tmp_path / "other").exists()
