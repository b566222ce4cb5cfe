"""The real LibreTranslate 1.9.6, unchanged, serving our Argos packages offline (issue 29).

`make lt-venv` builds its own virtualenv, .venv-lt (LibreTranslate pins its own dependencies,
argos-translate-lt 1.12.1 among them). `export_packages` writes a checkpoint's packages
(taskmoe-export --all-pairs DIR --format argos), and `start_libretranslate(packages, home)` is
the one way the harness starts LibreTranslate on them (research/compat_matrix.py,
research/bench/libretranslate.py, tests/test_libretranslate.py):

1. every .argosmodel of the folder is installed with Argos's own
   `argostranslate.package.install_from_path`, run by .venv-lt's Python, into a private folder
   `home` (ARGOS_PACKAGES_DIR = home/packages; XDG_DATA_HOME, XDG_CONFIG_HOME, XDG_CACHE_HOME,
   HOME and TMPDIR under it too, so nothing of the user's ~/.local is read or written);
2. `libretranslate --host 127.0.0.1 --port P --load-only CODES` starts in its own process group
   (cwd home/run, where it keeps db/), with a clean environment: no LT_* variable of the caller
   can turn on a model update;
3. the call returns once GET /languages answers with the installed languages; the handle
   (a research.bench.load.Server) records `install_s` and `startup_s` (launch to first answer)
   and `stop()` ends exactly that process group: SIGTERM, then SIGKILL.

What keeps it offline (read in libretranslate 1.9.6 `init.py`, `main.py`, `default_values.py`
and argos-translate-lt 1.12.1 `settings.py`, `sbd.py`, `networking.py`):
- its boot downloads the package index, every model and MiniSBD's splitters whenever FEWER
  THAN TWO packages are installed (`check_and_install_models`), or with `--update-models` /
  `--force-update-models` (off by default; LT_UPDATE_MODELS, LT_FORCE_UPDATE_MODELS). Offline
  the downloads retry for many minutes: at least two packages are required here, and
  `--load-only` (the packages' languages) would restrict any download to them;
- Argos's default splitter in LibreTranslate's fork is MiniSBD, which downloads an ONNX model at
  the first translation: ARGOS_CHUNK_TYPE=SPACY makes it load the blank spaCy pipeline each of
  our packages ships in spacy/ (spaCy is installed in .venv-lt for that; a package without
  spacy/ is refused here);
- with ARGOS_CHUNK_TYPE=SPACY, importing Argos downloads spaCy's xx_sent_ud_sm unless
  $XDG_CACHE_HOME/argos-translate/spacy/senter/model exists: the folder is made, empty;
- with `refuse_network` (the default) a sitecustomize.py on PYTHONPATH refuses, and records in
  home/connections.log, every connection and name lookup to a host other than this machine's
  loopback: `connections()` lists them (tests assert none).
"""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from research.bench.load import BIN, HOST, REPO, Server, free_port

LT_VENV = REPO / ".venv-lt"
LT_PYTHON = LT_VENV / "bin" / "python"
LT_COMMAND = LT_VENV / "bin" / "libretranslate"
LT_VERSION = "1.9.6"
# LibreTranslate 1.9.6 lists these Argos codes under other names in /languages
# (libretranslate/language.py's aliases; requests may use either)
LT_ALIASES = {"zh": "zh-Hans", "zt": "zh-Hant", "pb": "pt-BR"}
MIN_PACKAGES = 2  # fewer installed: LibreTranslate's boot downloads the index and every model
# what Argos reads from the environment, besides the folders (argostranslate/settings.py)
OFFLINE_ENV = {"ARGOS_CHUNK_TYPE": "SPACY", "ARGOS_DEVICE_TYPE": "cpu"}

_INSTALL = """
import json, sys
from argostranslate import package
for path in sys.argv[1:]:
    package.install_from_path(path)
print(json.dumps([{"from": p.from_code, "to": p.to_code, "path": str(p.package_path)}
                  for p in package.get_installed_packages()]))
"""

_ADD_KEYS = """
import json, sys
from libretranslate.api_keys import Database
db = Database(sys.argv[1])
for key, (per_minute, chars) in json.loads(sys.argv[2]).items():
    db.add(per_minute, key, chars or 0)
"""

# Loaded by every Python of the LibreTranslate process (PYTHONPATH): refuses and records every
# connection or name lookup that would leave this machine.
_GUARD = '''"""Written by research/libretranslate.py: no network for LibreTranslate."""
import os
import socket

_LOG = os.environ["TASKMOE_CONNECTIONS_LOG"]
_LOCAL = {None, "", "localhost", "127.0.0.1", "::1", "0.0.0.0", "::"}


def _refuse(what):
    with open(_LOG, "a") as f:
        f.write(repr(what) + "\\n")
    raise OSError(f"network refused by research/libretranslate.py: {what!r}")


def _local(address):
    if not isinstance(address, tuple):  # a Unix socket
        return True
    host = address[0]
    return host in _LOCAL or str(host).startswith("127.")


_connect, _connect_ex, _getaddrinfo = (socket.socket.connect, socket.socket.connect_ex,
                                       socket.getaddrinfo)


def connect(self, address):
    return _connect(self, address) if _local(address) else _refuse(address)


def connect_ex(self, address):
    return _connect_ex(self, address) if _local(address) else _refuse(address)


def getaddrinfo(host, *args, **kwargs):
    if host in _LOCAL or str(host).startswith("127."):
        return _getaddrinfo(host, *args, **kwargs)
    return _refuse(host)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = (connect, connect_ex,
                                                                       getaddrinfo)
'''


def export_packages(checkpoint: Path, data: Path, spm_model: Path, out: Path,
                    quantization: str = "int8") -> Path:
    """`taskmoe-export CHECKPOINT --all-pairs OUT --format argos`: one package per trained pair
    in OUT, the folder returned. Packages OUT already holds from the same checkpoint file (its
    size and time), --data, --spm-model and weight type (OUT/taskmoe-packages.json) are kept."""
    checkpoint, out = Path(checkpoint), Path(out)
    stat = checkpoint.stat()
    made = {"checkpoint": str(checkpoint.resolve()), "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "data": str(Path(data).resolve()),
            "spm_model": str(Path(spm_model).resolve()), "quantization": quantization}
    stamp = out / "taskmoe-packages.json"
    if stamp.exists() and json.loads(stamp.read_text()) == made and \
            list(out.glob("*.argosmodel")):
        return out
    exe = BIN / "taskmoe-export"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "fairseq_taskmoe.cli.export"]
    proc = subprocess.run(head + [str(checkpoint), "--all-pairs", str(out), "--format", "argos",
                                  "--data", str(data), "--spm-model", str(spm_model),
                                  "--quantization", quantization, "--force"],
                          capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise RuntimeError(f"taskmoe-export --format argos failed (exit {proc.returncode}): "
                           f"{proc.stderr[-3000:]}")
    stamp.write_text(json.dumps(made, indent=1) + "\n")
    return out


def unavailable() -> Optional[str]:
    """None when .venv-lt can run LibreTranslate, else why not (a test's skip reason)."""
    if not LT_COMMAND.exists():
        return (f"needs LibreTranslate {LT_VERSION} in its own virtualenv: make lt-venv "
                f"({LT_COMMAND} is missing)")
    return None


def package_files(folder: Path) -> List[Path]:
    """The .argosmodel files of `folder`, each checked: a zip with metadata.json (its
    from_code, to_code) and a spacy/ pipeline; at least MIN_PACKAGES of them."""
    folder = Path(folder)
    files = sorted(folder.glob("*.argosmodel"))
    if len(files) < MIN_PACKAGES:
        raise ValueError(
            f"{folder}: {len(files)} .argosmodel file(s); LibreTranslate needs at least "
            f"{MIN_PACKAGES} installed packages, else it downloads its package index and every "
            "model at start-up (taskmoe-export --all-pairs DIR --format argos writes one per "
            "trained pair)")
    for path in files:
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not an Argos package (not a zip file)")
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if not any(n.endswith("/metadata.json") and n.count("/") == 1 for n in names):
            raise ValueError(f"{path} has no TOP/metadata.json: not an Argos package")
        if not any(n.count("/") >= 2 and n.split("/")[1] == "spacy" for n in names):
            raise ValueError(
                f"{path} has no spacy/ pipeline: offline, LibreTranslate splits sentences with "
                "ARGOS_CHUNK_TYPE=SPACY and the package's own pipeline (export it where spaCy is "
                "importable, or with --spacy-pipeline DIR); its default splitter downloads")
    return files


def package_languages(files: Sequence[Path]) -> List[Tuple[str, str]]:
    """(from_code, to_code) of each package file, from its metadata.json."""
    pairs = []
    for path in files:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist()
                        if n.endswith("/metadata.json") and n.count("/") == 1)
            meta = json.loads(z.read(name))
        pairs.append((meta["from_code"], meta["to_code"]))
    return pairs


def environment(home: Path, extra: Optional[Dict[str, str]] = None,
                refuse_network: bool = True) -> Dict[str, str]:
    """LibreTranslate's whole environment: the folders under `home`, Argos's offline settings,
    PATH and the locale; `extra` (e.g. ARGOS_INTRA_THREADS) last."""
    home = Path(home)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
           "HOME": str(home), "TMPDIR": str(home / "tmp"),
           "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_CACHE_HOME": str(home / "cache"), "ARGOS_PACKAGES_DIR": str(home / "packages"),
           "PYTHONWARNINGS": "ignore", **OFFLINE_ENV}
    if refuse_network:
        env["PYTHONPATH"] = str(home / "guard")
        env["TASKMOE_CONNECTIONS_LOG"] = str(home / "connections.log")
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def prepare_home(home: Path, refuse_network: bool):
    """The private folders under `home`, which must be new or empty; the network guard."""
    home = Path(home)
    if home.exists() and any(home.iterdir()):
        raise ValueError(f"{home} is not empty: give a new folder (packages installed there "
                         "before would be served too)")
    for sub in ("tmp", "data", "config", "packages", "run", "logs"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    # Argos (sbd.py) downloads spaCy's xx_sent_ud_sm at import unless this folder exists
    (home / "cache" / "argos-translate" / "spacy" / "senter" / "model").mkdir(parents=True)
    if refuse_network:
        (home / "guard").mkdir()
        (home / "guard" / "sitecustomize.py").write_text(_GUARD)
        (home / "connections.log").write_text("")


def _run_lt_python(code: str, args: Sequence[str], env: Dict[str, str], what: str,
                   timeout: float) -> str:
    proc = subprocess.run([str(LT_PYTHON), "-c", code, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    return proc.stdout


def install_packages(files: Sequence[Path], home: Path, env: Dict[str, str],
                     timeout: float = 300) -> List[dict]:
    """argostranslate.package.install_from_path of each file, in .venv-lt, into home's
    folders; returns Argos's list of installed packages ({"from", "to", "path"})."""
    out = _run_lt_python(_INSTALL, [str(Path(f).resolve()) for f in files], env,
                         "installing the Argos packages", timeout)
    return json.loads(out.splitlines()[-1])


def add_api_keys(db_path: Path, keys: Dict[str, Tuple[int, Optional[int]]], env: Dict[str, str],
                 timeout: float = 120):
    """LibreTranslate's own key database (libretranslate.api_keys.Database, as `ltmanage keys
    add` writes it): {key: (requests per minute, character limit or None)}."""
    _run_lt_python(_ADD_KEYS, [str(db_path), json.dumps(keys)], env,
                   "adding LibreTranslate API keys", timeout)


class LibreTranslate(Server):
    """A running LibreTranslate: research.bench.load.Server (url, rss, peak_rss, log_tail)
    started in a process group of its own, which stop() ends; no /metrics of taskmoe-serve's."""

    has_batch_metrics = False

    def __init__(self, argv: List[str], url: str, log_path: Path, env: Dict[str, str],
                 home: Path):
        super().__init__(argv, url, log_path)
        self.env, self.home = env, Path(home)
        self.installed: List[dict] = []
        self.install_s: Optional[float] = None
        self.startup_s: Optional[float] = None
        self._launched_at: Optional[float] = None

    def launch(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self._launched_at = time.perf_counter()
            self.proc = subprocess.Popen(self.argv, cwd=self.home / "run", env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def start(self, timeout: float):
        """Launch (unless launched) and wait until GET /languages lists the installed
        languages; startup_s is the time from launch to that answer."""
        import httpx

        if self.proc is None:
            self.launch()
        want = {LT_ALIASES.get(code, code)
                for p in self.installed for code in (p["from"], p["to"])}
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libretranslate exited with {self.proc.returncode} at "
                                   f"start: {self.log_tail()}")
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"libretranslate did not answer /languages within "
                                   f"{timeout:.0f} s: {self.log_tail()}")
            try:
                answer = httpx.get(self.url + "/languages", timeout=2)
                if answer.status_code == 200 and \
                        want <= {lang["code"] for lang in answer.json()}:
                    self.startup_s = round(time.perf_counter() - self._launched_at, 2)
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def stop(self, grace: float = 30.0):
        """SIGTERM to the process group it was started in, SIGKILL after `grace` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
            try:
                os.killpg(self.proc.pid, sig)  # the group start_new_session made: pgid == pid
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def connections(self) -> List[str]:
        """Connections and name lookups refused so far (refuse_network), one per line."""
        log = self.home / "connections.log"
        return log.read_text().splitlines() if log.exists() else []


def start_libretranslate(packages: Path, home: Path, args: Sequence = (),
                         env: Optional[Dict[str, str]] = None,
                         api_keys: Optional[Dict[str, Tuple[int, Optional[int]]]] = None,
                         timeout: float = 180.0, refuse_network: bool = True) -> LibreTranslate:
    """Installs every .argosmodel of `packages` into the new private folder `home` with Argos's
    own install_from_path, starts the unchanged `libretranslate` on 127.0.0.1 (a free port, its
    own process group) and returns it once /languages answers. `args`: more libretranslate
    flags (e.g. --char-limit 3000, --threads 8); `env`: more environment (e.g.
    ARGOS_INTRA_THREADS); `api_keys`: {key: (requests per minute, character limit or None)}
    in a key database of LibreTranslate's own, with --api-keys --api-keys-db-path added.
    Stop it with .stop() (or use `running_libretranslate`)."""
    why = unavailable()
    if why:
        raise RuntimeError(why)
    files = package_files(packages)
    home = Path(home).resolve()
    prepare_home(home, refuse_network)
    lt_env = environment(home, env, refuse_network)
    t0 = time.perf_counter()
    installed = install_packages(files, home, lt_env)
    install_s = round(time.perf_counter() - t0, 2)
    if len(installed) < len(files):
        raise RuntimeError(f"Argos installed {len(installed)} of {len(files)} packages: "
                           f"{installed}")
    codes = sorted({c for p in installed for c in (p["from"], p["to"])})
    port = free_port()
    argv = [str(LT_COMMAND), "--host", HOST, "--port", str(port), "--load-only", ",".join(codes)]
    if api_keys:
        db = home / "run" / "db" / "api_keys.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        add_api_keys(db, api_keys, lt_env)
        argv += ["--api-keys", "--api-keys-db-path", str(db)]
    argv += [str(a) for a in args]
    server = LibreTranslate(argv, f"http://{HOST}:{port}", home / "logs" / "libretranslate.log",
                            lt_env, home)
    server.installed, server.install_s = installed, install_s
    try:
        return server.start(timeout)
    except BaseException:
        server.stop()
        raise


@contextmanager
def running_libretranslate(packages: Path, home: Path, **kwargs):
    """start_libretranslate as a context: the server, always stopped afterwards."""
    server = start_libretranslate(packages, home, **kwargs)
    try:
        yield server
    finally:
        server.stop()
