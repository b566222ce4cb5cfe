"""taskmoe-serve's sub-network registry (serve/registry.py) and engines: the cache, failures,
eviction and memory accounting (issue 26), and a warm start that reads the checkpoint's facts
from the cache (facts.json) and imports neither torch nor fairseq, on the session's tiny trained
task-MoE and a dense twin of it. Most tests drive the Registry directly with the fairseq backend
(no export to build); the ones about CTranslate2 or the start-up go through the real server."""

import gc
import os
import shutil
import time
import weakref
from pathlib import Path

import pytest

from test_cli import train
from test_serve import make_service, post, sentences, serving

EN_DE, DE_EN, EN_FR = ("en", "de"), ("de", "en"), ("en", "fr")


def registry(checkpoint, data, cache, backend="fairseq", **kwargs):
    from fairseq_taskmoe.serve.metrics import Metrics
    from fairseq_taskmoe.serve.registry import Registry

    kwargs.setdefault("quantization", "float32")
    return Registry(str(checkpoint), str(data), kwargs.pop("spm_model", None), backend=backend,
                    cache_dir=str(cache), metrics=Metrics(), **kwargs)


def state_bytes(tensors) -> int:
    """Bytes of distinct tensors (tied ones once)."""
    import torch

    seen = {(t.data_ptr(), tuple(t.shape), t.dtype): t.numel() * t.element_size()
            for t in tensors if isinstance(t, torch.Tensor)}
    return sum(seen.values())


def loaded_gauge(reg) -> float:
    return reg.metrics.registry.get_sample_value("taskmoe_subnetworks_loaded")


@pytest.fixture(scope="module")
def dense_twin(tiny_data, tmp_path_factory) -> Path:
    """The tiny task-MoE's dense twin (--moe-freq 0: no MoE layer, nothing to prune), trained a
    few updates with the same data and flags: served whole, `*-*`."""
    save_dir = tmp_path_factory.mktemp("dense")
    train(tiny_data, save_dir, ["--moe-freq", "0"], updates=40)
    return save_dir / "checkpoint_best.pt"


@pytest.fixture(scope="module")
def pruned_en_de(trained_tiny, tmp_path_factory) -> Path:
    import torch

    from fairseq_taskmoe.deploy.pruning import prune_checkpoint
    from fairseq_taskmoe.integration.compat import load_checkpoint

    path = tmp_path_factory.mktemp("pruned") / "en-de.pt"
    torch.save(prune_checkpoint(load_checkpoint(str(trained_tiny)), "en-de")[0], path)
    return path


# --- item 1: the cache never reads or deletes another run's files --------------------------------


def test_a_whole_checkpoint_is_the_file_given_now_and_never_deleted(pruned_en_de, tiny_data,
                                                                    tmp_path, monkeypatch):
    """Same bytes at A and B share one cache; the server on B serves B (not the A recorded by
    the run that built the cache) and a failed load deletes neither."""
    from fairseq_taskmoe.serve import engines
    from fairseq_taskmoe.serve.registry import Unavailable

    a, b = tmp_path / "a" / "en-de.pt", tmp_path / "b" / "en-de.pt"
    for path in (a, b):
        path.parent.mkdir()
        shutil.copyfile(pruned_en_de, path)
    first = registry(a, tiny_data, tmp_path / "cache")
    first.prepare([EN_DE])
    second = registry(b, tiny_data, tmp_path / "cache")
    second.prepare([EN_DE])
    assert second.cache == first.cache
    sub = second.subnetwork(second.key_of(EN_DE))
    assert sub.whole and sub.path == str(b.resolve())
    plan = (Path(second.cache) / "plan.json").read_text()
    assert str(tmp_path) not in plan  # no absolute path recorded

    def out_of_memory(self, *args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(engines.FairseqEngine, "__init__", out_of_memory)
    with pytest.raises(Unavailable, match="did not load from the checkpoint .*MemoryError"):
        with second.use(sub.key):
            pass
    assert a.is_file() and b.is_file()


def test_a_copied_cache_reads_and_rebuilds_its_own_artifacts_only(trained_tiny, tiny_data,
                                                                   tmp_path):
    original = registry(trained_tiny, tiny_data, tmp_path / "one")
    original.prepare([EN_DE])
    artifact = Path(original.subnetwork("*-de").path)
    before = artifact.read_bytes()
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    copied = registry(trained_tiny, tiny_data, tmp_path / "two")
    copied.prepare([EN_DE])
    mine = Path(copied.subnetwork("*-de").path)
    assert mine.parent == Path(copied.cache) and (tmp_path / "two") in mine.parents
    mine.write_bytes(b"not a model")  # corrupt: rebuilt in the copy, the original untouched
    with copied.use("*-de") as engine:
        assert engine.translate(["e1 e2"], "en", "de", beam=2)[0][0]
    assert mine.stat().st_size > 1000 and artifact.read_bytes() == before
    # every delete goes through one guard that refuses anything outside the cache folder
    for outside in (artifact, Path(trained_tiny), Path(copied.cache)):
        with pytest.raises(RuntimeError, match="not inside the cache folder"):
            copied._remove(str(outside))
        assert outside.exists()


# --- item 2: a dense checkpoint over CTranslate2 answers each pair in its own target -----------


def test_dense_checkpoint_over_ctranslate2_translates_into_the_pair_asked(dense_twin, tiny_data,
                                                                          tmp_path):
    pytest.importorskip("ctranslate2")
    from fairseq_taskmoe.ct2 import load_ct2_translator
    from fairseq_taskmoe.deploy.export import extract_dense, write_ctranslate2
    from fairseq_taskmoe.integration.compat import load_checkpoint

    source = sentences(tiny_data, "en")[:8]
    with serving([dense_twin, "--data", tiny_data, "--cache-dir", tmp_path / "cache",
                  "--quantization", "float32", "--beam", "4"]) as (url, service):
        assert service.registry.backend == "ctranslate2"
        assert service.registry.key_of(EN_DE) == service.registry.key_of(EN_FR) == "*-*"
        got = {}
        for tgt in ("de", "fr"):
            answer = post(url, "/translate", json={"q": source, "source": "en", "target": tgt})
            assert answer.status_code == 200, answer.text
            assert answer.json()["route"] == {"kind": "direct", "via": None}
            got[tgt] = answer.json()["translatedText"]
    assert got["fr"] != got["de"]
    # each equals CTranslate2 on an export made for that very pair
    state = load_checkpoint(str(dense_twin))
    for tgt in ("de", "fr"):
        out = tmp_path / f"en-{tgt}.ct2"
        write_ctranslate2(extract_dense(state, f"en-{tgt}"), str(out), data=str(tiny_data),
                          quantization="float32")
        assert got[tgt] == load_ct2_translator(str(out), intra_threads=1).translate(source,
                                                                                    beam=4)


# --- item 5: the cache is keyed on every input of an artifact -----------------------------------


def test_the_cache_key_covers_every_input_of_an_artifact(trained_tiny, tiny_data, tmp_path):
    pytest.importorskip("ctranslate2")
    from fairseq_taskmoe.serve import registry as registry_module

    def cache(data=tiny_data, **kwargs):
        return registry(trained_tiny, data, tmp_path, backend="ctranslate2", **kwargs).cache

    base = cache()
    spm = tmp_path / "spm.model"
    spm.write_bytes(b"one")
    with_spm = cache(spm_model=str(spm))
    spm.write_bytes(b"two")
    other_spm = cache(spm_model=str(spm))
    other_data = tmp_path / "data"
    shutil.copytree(tiny_data, other_data)
    with open(other_data / "dict.de.txt", "a") as f:
        f.write("d99 1\n")
    caches = [base, with_spm, other_spm, cache(data=other_data), cache(quantization="int8"),
              registry(trained_tiny, tiny_data, tmp_path, backend="fairseq").cache]
    assert len(set(caches)) == len(caches)
    assert cache() == base  # and the same inputs find the same cache
    # the code's part of the key is a hash of the modules that write artifacts, no constant
    assert not hasattr(registry_module, "ARTIFACT_VERSION")
    assert {"fairseq_taskmoe.deploy.export", "fairseq_taskmoe.deploy.pruning"} <= set(
        registry_module.ARTIFACT_CODE)
    module = tmp_path / "fake_writer.py"
    module.write_text("X = 1\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        before = registry_module.code_version.__wrapped__(("fake_writer",))
        module.write_text("X = 2\n")
        after = registry_module.code_version.__wrapped__(("fake_writer",))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fake_writer", None)
    assert before != after


# --- item 6: only a corrupt artifact is rebuilt; other failures are retried after a backoff ------


def test_a_transient_load_failure_keeps_the_artifact_and_is_retried(trained_tiny, tiny_data,
                                                                    tmp_path, monkeypatch):
    from fairseq_taskmoe.serve import registry as registry_module
    from fairseq_taskmoe.serve.registry import Registry, Unavailable

    reg = registry(trained_tiny, tiny_data, tmp_path)
    reg.prepare([EN_DE])
    artifact = Path(reg.subnetwork("*-de").path)
    stat = artifact.stat()
    monkeypatch.setattr(registry_module, "RETRY_FIRST", 0.5)
    original, calls = Registry._make_engine, []

    def flaky(self, sub):
        calls.append(sub.key)
        if len(calls) == 1:
            raise MemoryError("simulated")
        return original(self, sub)

    def no_rebuild(self, sub):
        raise AssertionError("an intact artifact was rebuilt")

    monkeypatch.setattr(Registry, "_make_engine", flaky)
    monkeypatch.setattr(Registry, "_write_artifact", no_rebuild)
    with pytest.raises(Unavailable, match=r"sub-network \*-de: .*MemoryError: simulated"):
        with reg.use("*-de"):
            pass
    assert artifact.stat().st_ino == stat.st_ino and artifact.stat().st_mtime_ns == \
        stat.st_mtime_ns
    with pytest.raises(Unavailable, match=r"MemoryError: simulated\) \(tried again in 0.\d s\)"):
        with reg.use("*-de"):  # within the backoff: answered at once, no new try
            pass
    assert calls == ["*-de"]
    time.sleep(0.6)
    with reg.use("*-de") as engine:  # the error expired: tried again, and it loads
        assert engine.translate(["e1 e2"], "en", "de", beam=2)[0][0]
    assert calls == ["*-de", "*-de"] and reg.subnetwork("*-de").error is None


# --- items 8 and 16: eviction -------------------------------------------------------------------


@pytest.fixture
def three(trained_tiny, tiny_data, tmp_path_factory):
    """A registry with *-de, *-en, *-fr (fairseq backend), charged 100, 100 and 160 bytes."""
    reg = registry(trained_tiny, tiny_data, tmp_path_factory.mktemp("three"), load_timeout=0.3)
    reg.prepare([EN_DE, DE_EN, EN_FR])
    for key, size in {"*-de": 100, "*-en": 100, "*-fr": 160}.items():
        reg.subnetwork(key).bytes = size
    return reg


def test_eviction_releases_the_engine_outside_the_lock_and_never_collects(three, monkeypatch):
    collects = []
    monkeypatch.setattr(gc, "collect", lambda *args: collects.append(args) or 0)
    three.memory_budget = 160  # one sub-network at a time
    with three.use("*-de") as engine:
        evicted = weakref.ref(engine)
        del engine
    gc.disable()  # what frees it must be the registry dropping its reference
    try:
        with three.use("*-en"):
            assert three.loaded_keys() == ["*-en"] and three.evictions == 1
            assert evicted() is None  # released already, not waiting for a collection
    finally:
        gc.enable()
    assert collects == []


def test_eviction_gives_the_freed_heap_back(three, monkeypatch):
    """After an evicted engine is released, the heap is trimmed (glibc keeps freed chunks in its
    arenas otherwise, and RSS stays where the evicted engine left it); a load with nothing to
    evict trims nothing."""
    from fairseq_taskmoe.serve import registry as registry_module

    trims = []
    monkeypatch.setattr(registry_module, "trim_heap", lambda: trims.append(1))
    three.memory_budget = 160  # one sub-network at a time
    with three.use("*-de"):
        pass
    assert trims == []
    with three.use("*-en"):
        assert three.evictions == 1 and trims == [1]
    three.dropped("*-en", "test")
    assert trims == [1, 1]
    three.dropped("*-en", "gone already")
    assert trims == [1, 1]


def test_trim_heap_runs_here():
    from fairseq_taskmoe.serve.registry import _malloc_trim, trim_heap

    trim_heap()  # glibc here: malloc_trim(0); elsewhere a no-op
    assert _malloc_trim() is not None


def test_a_load_that_cannot_fit_evicts_nothing_and_waits_the_timeout_given(three):
    from fairseq_taskmoe.serve.registry import Unavailable

    three.memory_budget = 250
    with three.use("*-de"):  # pinned
        with three.use("*-en"):
            pass  # loaded, not pinned
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match=r"no room to load it within 0.3 s under"):
            with three.use("*-fr"):  # 100 pinned + 160 > 250 even with *-en evicted
                pass
        assert 0.25 <= time.monotonic() - t0 < 5  # load_timeout, not 300 s
        assert three.loaded_keys() == ["*-de", "*-en"] and three.evictions == 0
        with pytest.raises(Unavailable, match=r"within 0.05 s"):  # the caller's timeout
            with three.use("*-fr", timeout=0.05):
                pass
    assert loaded_gauge(three) == 2


def test_gauges_are_current_after_a_failed_load(three, monkeypatch):
    from fairseq_taskmoe.serve.registry import Registry, Unavailable

    three.memory_budget = 250
    for key in ("*-de", "*-en"):
        with three.use(key):
            pass
    assert loaded_gauge(three) == 2

    def out_of_memory(self, sub):
        raise MemoryError("simulated")

    monkeypatch.setattr(Registry, "_make_engine", out_of_memory)
    with pytest.raises(Unavailable, match="MemoryError"):
        with three.use("*-fr"):  # evicts both to make room, then fails
            pass
    assert three.loaded_keys() == [] and loaded_gauge(three) == 0
    assert three.metrics.registry.get_sample_value("taskmoe_subnetworks_bytes") == 0


# --- item 18: memory is charged what is resident ------------------------------------------------


def test_fairseq_subnetworks_are_charged_their_weights_not_their_files(trained_tiny, dense_twin,
                                                                       tiny_data, tmp_path):
    from fairseq_taskmoe.integration.compat import load_checkpoint

    for checkpoint, pair, key in ((trained_tiny, EN_DE, "*-de"), (dense_twin, EN_FR, "*-*")):
        reg = registry(checkpoint, tiny_data, tmp_path / key.replace("*", "all"))
        reg.prepare([pair])
        sub = reg.subnetwork(reg.key_of(pair))
        assert sub.key == key
        with reg.use(sub.key) as engine:
            model = next(iter(engine.hubs.values())).models[0]
            resident = state_bytes(model.state_dict().values())
        assert sub.bytes == resident
        weights = state_bytes(load_checkpoint(str(checkpoint))["model"].values())
        assert reg.full_bytes == weights < os.path.getsize(checkpoint)  # no optimizer state
    assert sub.whole and sub.bytes == reg.full_bytes  # the dense twin: served whole


# --- item 12: a pruned multi-pair checkpoint on the default backend -----------------------------


def test_a_pruned_multi_pair_checkpoint_is_served(trained_tiny, tiny_data, tmp_path):
    """On the default backend: pruned without one merged FFN per pair, by fairseq (the note
    says why and what to run); merged, by CTranslate2, one export per pair."""
    import torch

    from fairseq_taskmoe.ct2 import load_ct2_translator
    from fairseq_taskmoe.deploy.export import extract_dense, write_ctranslate2
    from fairseq_taskmoe.deploy.pruning import prune_checkpoint
    from fairseq_taskmoe.hub import load_translator
    from fairseq_taskmoe.integration.compat import load_checkpoint

    source = sentences(tiny_data, "en")[:6]
    state = load_checkpoint(str(trained_tiny))
    unmerged = tmp_path / "unmerged.pt"
    torch.save(prune_checkpoint(state, "en-de,en-fr", merge=False)[0], unmerged)
    want = {tgt: load_translator(unmerged, data=tiny_data, source_lang="en",
                                 target_lang=tgt).translate(source, beam=4)
            for tgt in ("de", "fr")}
    assert want["de"] != want["fr"]
    with serving([unmerged, "--data", tiny_data, "--cache-dir", tmp_path / "cache",
                  "--beam", "4"]) as (url, service):  # the default backend: ctranslate2
        assert service.registry.backend == "fairseq"
        note = service.registry.backend_note
        assert "no CTranslate2 export" in note and "taskmoe-prune" in note
        for tgt in ("de", "fr"):
            answer = post(url, "/translate", json={"q": source, "source": "en", "target": tgt})
            assert answer.status_code == 200, answer.text
            assert answer.json()["translatedText"] == want[tgt]

    pytest.importorskip("ctranslate2")
    # de and fr routed to disjoint experts: pruned for both, each layer merges (one FFN each)
    for side in ("encoder", "decoder"):
        gate = state["model"][f"{side}.layers.1.ffn.router.wg.weight"]  # [target, E]
        gate[1] = torch.tensor([5.0, 5.0, -5.0, -5.0])  # de
        gate[2] = torch.tensor([-5.0, -5.0, 5.0, 5.0])  # fr
    merged_state, report = prune_checkpoint(state, "en-de,en-fr")
    assert {layer.form for layer in report.layers} == {"merged"}
    merged = tmp_path / "merged.pt"
    torch.save(merged_state, merged)
    with serving([merged, "--data", tiny_data, "--cache-dir", tmp_path / "cache",
                  "--quantization", "float32", "--beam", "4"]) as (url, service):
        assert service.registry.backend == "ctranslate2"
        got = {}
        for tgt in ("de", "fr"):
            assert service.registry.key_of(("en", tgt)) == f"*-{tgt}"
            answer = post(url, "/translate", json={"q": source, "source": "en", "target": tgt})
            assert answer.status_code == 200, answer.text
            got[tgt] = answer.json()["translatedText"]
            out = tmp_path / f"en-{tgt}.ct2"
            write_ctranslate2(extract_dense(merged_state, f"en-{tgt}"), str(out),
                              data=str(tiny_data), quantization="float32")
            assert got[tgt] == load_ct2_translator(str(out), intra_threads=1).translate(
                source, beam=4)
        assert got["de"] != got["fr"]


# --- item 20: --cache-dir -----------------------------------------------------------------------


def test_cache_dir_is_created_or_refused_with_a_message(trained_tiny, tiny_data, tmp_path,
                                                        capsys):
    args = ["--data", tiny_data, "--backend", "fairseq", "--pairs", "en-de"]
    blocked = tmp_path / "a-file" / "cache"
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        make_service([trained_tiny, "--cache-dir", blocked, *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("taskmoe-serve: error: --cache-dir ") and str(blocked) in err, err
    if os.geteuid() != 0:  # root writes anywhere
        from fairseq_taskmoe.serve.registry import CacheDirError

        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(CacheDirError, match=f"--cache-dir {locked} cannot be used"):
            registry(trained_tiny, tiny_data, locked).prepare([EN_DE])
    missing = tmp_path / "new" / "cache"
    service, _ = make_service([trained_tiny, "--cache-dir", missing, *args])
    service.batcher.close()
    assert missing.is_dir()


# --- item 23: CTranslate2 decoding is bounded by the decoder's positions ------------------------


def test_ct2_decoding_is_bounded_by_the_decoders_positions(trained_tiny, tiny_data, tmp_path):
    pytest.importorskip("ctranslate2")
    reg = registry(trained_tiny, tiny_data, tmp_path, backend="ctranslate2")
    reg.prepare([EN_DE])
    reg.max_source_positions, reg.max_target_positions = 1024, 12
    engine = reg._make_engine(reg.subnetwork("*-de"))
    assert engine.max_input_tokens == 1022
    seen = {}

    class Recording:
        def __init__(self, translator):
            self.translator = translator

        def translate_batch(self, *args, **kwargs):
            seen.update(kwargs)
            return self.translator.translate_batch(*args, **kwargs)

    engine.mt.translator = Recording(engine.mt.translator)
    engine.translate(["e1 e2 e3"], "en", "de", beam=2)
    assert seen["max_decoding_length"] == 11 + 1  # decoder positions - 1, plus the __de__ prefix


# --- a warm start reads facts.json, not the checkpoint: no torch, no fairseq -------------------

# taskmoe-serve's own start-up (cli/serve.py's parser and make_service, the app under uvicorn on
# 127.0.0.1) in a fresh process: asks /health and one /translate per pair, stops, and prints the
# answers and which of torch and fairseq it imported
WARM_START = r"""
import json, sys, threading, time
import httpx, uvicorn
from fairseq_taskmoe.cli.serve import build_parser, make_service
from fairseq_taskmoe.serve.app import create_app

pairs, args = json.loads(sys.argv[1]), build_parser().parse_args(sys.argv[2:])
service, keys = make_service(args)
server = uvicorn.Server(uvicorn.Config(create_app(service, keys), host="127.0.0.1",
                                       port=args.port, log_level="warning"))
thread = threading.Thread(target=server.run, daemon=True)
thread.start()
deadline = time.time() + 60
while not server.started:
    assert time.time() < deadline and thread.is_alive(), "server did not start"
    time.sleep(0.05)
url = f"http://127.0.0.1:{args.port}"
health = httpx.get(url + "/health", timeout=30).status_code
answers = {}
for pair, q in pairs.items():
    src, tgt = pair.split("-")
    answers[pair] = httpx.post(url + "/translate", json={"q": q, "source": src, "target": tgt},
                               timeout=60).json()
server.should_exit = True
thread.join(30)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "fairseq"))
print(json.dumps({"health": health, "answers": answers, "loaded": loaded[:10]}))
"""


def test_a_warm_start_imports_neither_torch_nor_fairseq_and_answers_the_same(trained_tiny,
                                                                             tiny_data, tmp_path):
    """The first start reads the checkpoint (torch) and builds; a later one on the same cache,
    in a fresh process as taskmoe-serve starts, finds every artifact and the checkpoint's facts
    in the cache and serves the same answers without ever importing torch or fairseq."""
    pytest.importorskip("ctranslate2")
    import json
    import subprocess
    import sys

    from test_cli import ENV, REPO
    from test_serve import free_port

    cache = tmp_path / "cache"
    argv = [trained_tiny, "--data", tiny_data, "--cache-dir", cache, "--beam", "4"]
    pairs = {"en-de": sentences(tiny_data, "en")[0], "de-en": sentences(tiny_data, "de")[0],
             "de-fr": sentences(tiny_data, "de")[1]}  # de-fr: a pivot, through en
    cold = {}
    with serving(argv) as (url, service):  # the cold start, in this process
        assert service.registry.backend == "ctranslate2"
        for pair, q in pairs.items():
            src, tgt = pair.split("-")
            cold[pair] = post(url, "/translate", json={"q": q, "source": src,
                                                       "target": tgt}).json()
    assert (Path(service.registry.root) / "facts.json").is_file()
    done = subprocess.run(
        [sys.executable, "-c", WARM_START, json.dumps(pairs),
         *[str(a) for a in argv], "--port", str(free_port()), "--log-level", "warning"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    warm = json.loads(done.stdout.strip().splitlines()[-1])
    assert warm["health"] == 200
    assert warm["answers"] == cold and all("translatedText" in a for a in cold.values())
    assert warm["loaded"] == [], f"a warm start imported {warm['loaded']}"


def test_facts_are_keyed_by_the_checkpoints_bytes_and_a_bad_file_is_read_again(
        trained_tiny, tiny_data, tmp_path, monkeypatch):
    """facts.json lives in the checkpoint digest's folder and records the digest: a changed
    checkpoint (other bytes) never reads another's facts; a missing, corrupt or malformed file
    is read from the checkpoint again (no crash) and rewritten."""
    import json

    import torch

    from fairseq_taskmoe.integration.compat import load_checkpoint
    from fairseq_taskmoe.serve.registry import Registry

    reads = []
    original = Registry._checkpoint_facts

    def counted(self):
        reads.append(self.checkpoint)
        return original(self)

    monkeypatch.setattr(Registry, "_checkpoint_facts", counted)
    first = registry(trained_tiny, tiny_data, tmp_path)
    first.prepare([])  # writes facts.json (nothing to build)
    facts = Path(first.root) / "facts.json"
    record = json.loads(facts.read_text())
    assert record["facts"] == first.facts.as_json() and record["full_bytes"] == first.full_bytes
    assert reads == [str(trained_tiny)]

    def start():
        reg = registry(trained_tiny, tiny_data, tmp_path)
        assert (reg.facts, reg.full_bytes, reg.max_source_positions, reg.max_target_positions) == (
            first.facts, first.full_bytes, first.max_source_positions, first.max_target_positions)
        return reg

    start()
    assert len(reads) == 1  # warm: from facts.json
    for bad in (None, "{not json", "[]", json.dumps(dict(record, full_bytes="many")),
                json.dumps(dict(record, facts=dict(record["facts"], langs="en,de"))),
                json.dumps(dict(record, code="another version"))):
        if bad is None:
            facts.unlink()
        else:
            facts.write_text(bad)
        before = len(reads)
        start().prepare([])
        assert len(reads) == before + 1, bad  # read from the checkpoint again ...
        assert json.loads(facts.read_text()) == record  # ... and rewritten
    # a changed checkpoint: other bytes, other facts, another folder; even handed the old facts
    state = load_checkpoint(str(trained_tiny))
    state["cfg"]["model"].max_target_positions = 77
    changed = tmp_path / "changed.pt"
    torch.save(state, changed)
    other = registry(changed, tiny_data, tmp_path)
    assert other.root != first.root and other.max_target_positions == 77
    assert reads[-1] == str(changed)
    other.prepare([])
    shutil.copyfile(facts, Path(other.root) / "facts.json")  # the digest inside differs
    before = len(reads)
    again = registry(changed, tiny_data, tmp_path)
    assert again.max_target_positions == 77 and reads[before:] == [str(changed)]
    assert first.facts == again.facts  # the languages and routing are the same model's
