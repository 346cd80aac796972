"""A real ComfyUI server with this node pack installed, for tests (the "real host").

(PYTEST_DONT_REWRITE: test modules import this file before `pytest_plugins` registers it; it has no
asserts, and the marker keeps pytest from warning that it cannot rewrite an imported module.)

What it does: copies the ComfyUI tree ($COMFYUI_DIR, else ../shared/ComfyUI) to a temp dir, links
this repository into its custom_nodes/ as `sama`, starts `main.py --cpu` on a free loopback port with
the hub offline, waits for /object_info, and drives it over HTTP. The server never outlives the test
process: it is stopped at fixture teardown, at interpreter exit, and (Linux) killed by the kernel if
the test process dies.

Use from a test module:

    pytest_plugins = ["comfy_host"]          # registers the session-scoped `comfy_server` fixture

    def test_something(comfy_server):
        save_file(state_dict, comfy_server.model_path("diffusion_models", "tiny.safetensors"))
        result = comfy_server.run(api_prompt)          # queue + wait; raises PromptFailed on errors
        frames = result.files("9")                      # saved files of node "9", in order

Also importable without the fixture: `ComfyHost(comfyui_dir).start()` ... `.stop()`, or
`with ComfyHost(comfyui_dir) as host:`. `import_pack()` imports this repository as a package the way
ComfyUI does (needed for pack modules that use `from ..sama_core import ...`).
"""

from __future__ import annotations

import ast
import atexit
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_FOLDER = "sama"  # the pack's folder name inside custom_nodes/
PACK_PYTHON_MODULE = f"custom_nodes.{PACK_FOLDER}"  # "python_module" of our nodes in /object_info
WORKFLOWS_DIR = REPO / "workflows"

# Node types the ComfyUI frontend adds to UI workflows that have no backend class (never in /object_info).
FRONTEND_ONLY_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})

# Top-level entries of a ComfyUI checkout the server does not need; a real install keeps gigabytes of
# models and other packs in some of them.
_SKIPPED_TOP_LEVEL = frozenset({
    ".git", ".github", ".ci", "tests", "tests-unit", "script_examples",
    "models", "output", "input", "temp", "user", "custom_nodes",
})
_MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "clip_vision", "loras")


# sitecustomize.py for the server process: no network but loopback (the tests' "no network at run time").
NETWORK_GUARD = """
import ipaddress, os, socket

_log = os.environ.get("SAMA_NETWORK_GUARD_LOG")
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _allowed(address):
    if not isinstance(address, tuple):
        return True  # unix sockets
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _guard(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _allowed(address):
        if _log:
            with open(_log, "a") as f:
                f.write(f"{address}\\n")
        raise OSError(f"network disabled by the SAMA test guard: {address}")


def connect(self, address):
    _guard(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _guard(self, address)
    return _connect_ex(self, address)


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
"""


class ComfyHostError(RuntimeError):
    """The server could not be started, died, or did not answer."""


class PromptRejected(ComfyHostError):
    """POST /prompt answered an HTTP error: the prompt did not validate (bad type, value out of range, ...).

    `status` is the HTTP status, `error` ComfyUI's {"type", "message", "details", ...} and `node_errors`
    {node id: {"errors": [{"type", "message", "details", "extra_info"}], "class_type", ...}}.
    """

    def __init__(self, status: int, body):
        self.status = status
        self.body = body
        self.error = body.get("error", {}) if isinstance(body, dict) else {}
        self.node_errors = body.get("node_errors", {}) if isinstance(body, dict) else {}
        super().__init__(f"ComfyUI rejected the prompt (HTTP {status}): {json.dumps(body, indent=1)[:4000]}")


@dataclass
class PromptResult:
    """One finished prompt, from /history/<prompt_id>."""

    prompt_id: str
    status: str  # "success" or "error" (an interrupted prompt is "error" with interrupted == True)
    outputs: dict  # node id -> that node's UI output, e.g. {"images": [{"filename", "subfolder", "type"}]}
    messages: list  # [(event, data)]: execution_start, execution_cached, execution_success/error/interrupted
    folders: dict = field(repr=False, default_factory=dict)  # "output"/"temp"/"input" -> Path

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def interrupted(self) -> bool:
        return any(event == "execution_interrupted" for event, _ in self.messages)

    @property
    def error(self) -> dict | None:
        """The execution_error event data (node_id, node_type, exception_type, exception_message,
        traceback, ...) or None."""
        for event, data in self.messages:
            if event == "execution_error":
                return data
        return None

    def files(self, node_id: str | None = None) -> list[Path]:
        """Paths of the files a node (or every node) reported in its UI output, in the reported order."""
        node_ids = [str(node_id)] if node_id is not None else list(self.outputs)
        paths = []
        for nid in node_ids:
            for value in self.outputs.get(nid, {}).values():
                if not isinstance(value, list):
                    continue
                for item in value:
                    if isinstance(item, dict) and "filename" in item and item.get("type") in self.folders:
                        folder = self.folders[item["type"]] / item.get("subfolder", "")
                        paths.append(folder / item["filename"])
        return paths


class PromptFailed(ComfyHostError):
    """A queued prompt finished with an execution error or was interrupted; `result` has the details."""

    def __init__(self, result: PromptResult, log_tail: str = ""):
        self.result = result
        error = result.error or {}
        what = "was interrupted" if result.interrupted else (
            f"failed in node {error.get('node_id')} ({error.get('node_type')}): "
            f"{error.get('exception_type')}: {error.get('exception_message')}")
        super().__init__(f"Prompt {result.prompt_id} {what}\n--- server log tail ---\n{log_tail}")


# ----------------------------------------------------------------------------------------------------------
# Locating ComfyUI and the pack


def find_comfyui() -> Path | None:
    """$COMFYUI_DIR, else ../shared/ComfyUI next to this repository; None when neither is a ComfyUI tree."""
    env = os.environ.get("COMFYUI_DIR")
    candidate = Path(env) if env else REPO.parent / "shared" / "ComfyUI"
    return candidate.resolve() if (candidate / "main.py").is_file() else None


def skip_reason_without_comfyui() -> str:
    env = os.environ.get("COMFYUI_DIR")
    if env:
        return f"COMFYUI_DIR={env} is not a ComfyUI tree (no main.py there)"
    return (f"no ComfyUI found: set COMFYUI_DIR to a ComfyUI checkout (default "
            f"{REPO.parent / 'shared' / 'ComfyUI'} does not exist)")


def import_pack(name: str = "sama_pack"):
    """Import this repository as a package named `name`, as ComfyUI does, and return it.

    `name` must not contain a dot (ComfyUI uses the folder path with "." replaced): under a dotted name
    whose parent is not in sys.modules, `from ..sama_core.x import y` raises ModuleNotFoundError.

    Pack modules use relative imports across the repo (`nodes/*.py` does `from ..sama_core import`),
    which only work when the repository root is a package. Then import submodules by full name, e.g.
    `importlib.import_module("sama_pack.nodes.convert")`. Note `sama_pack.sama_core` is a separate
    module object from a test's `import sama_core`: take exception classes from the pack module.
    """
    if "." in name:
        raise ValueError(f"import_pack needs a module name without dots, got {name!r}")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# ----------------------------------------------------------------------------------------------------------
# What the pack declares, read from the source (independent of what the server reports)


@dataclass
class DeclaredNode:
    node_id: str
    display_name: str | None
    category: str | None
    source: str  # file name under nodes/
    inputs: list[tuple[str, bool]] | None  # [(name, optional)] in order; None when not a literal list
    outputs: list[str] | None  # output type attribute names (e.g. "Image", "Int"); None when not literal


def registered_node_modules(nodes_dir: Path = REPO / "nodes") -> tuple[str, ...]:
    """NODE_MODULES as written in nodes/__init__.py (read with `ast`, nothing imported)."""
    tree = ast.parse((nodes_dir / "__init__.py").read_text())
    value = _module_constants(tree).get("NODE_MODULES")
    if not isinstance(value, (tuple, list)):
        raise AssertionError("nodes/__init__.py must define NODE_MODULES as a literal tuple of module names")
    return tuple(value)


def declared_pack_nodes(module_names=None, nodes_dir: Path = REPO / "nodes") -> dict[str, DeclaredNode]:
    """Every `io.Schema(node_id=...)` written in nodes/<module>.py, parsed with `ast` (no import, no ComfyUI).

    module_names: which files to read (default: the registered NODE_MODULES; "all" for every nodes/*.py).
    """
    if module_names is None:
        module_names = registered_node_modules(nodes_dir)
    if module_names == "all":
        paths = sorted(nodes_dir.glob("*.py"))
    else:
        paths = [nodes_dir / f"{name}.py" for name in module_names]
    declared = {}
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        constants = _module_constants(tree)
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and _call_name(call.func) == "Schema"):
                continue
            kwargs = {kw.arg: kw.value for kw in call.keywords}
            node_id = _literal(kwargs.get("node_id"), constants)
            if not isinstance(node_id, str):
                continue
            declared[node_id] = DeclaredNode(
                node_id=node_id,
                display_name=_literal(kwargs.get("display_name"), constants),
                category=_literal(kwargs.get("category"), constants),
                source=path.name,
                inputs=_declared_inputs(kwargs.get("inputs")),
                outputs=_declared_outputs(kwargs.get("outputs")),
            )
    return declared


def _call_name(func) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def _module_constants(tree: ast.Module) -> dict:
    """Module-level `NAME = <literal>` assignments (e.g. CATEGORY = "SAMA/frames")."""
    constants = {}
    for statement in tree.body:
        if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)):
            value = _literal(statement.value)
            if value is not None:
                constants[statement.targets[0].id] = value
    return constants


def _literal(node, constants: dict | None = None):
    if node is None:
        return None
    if isinstance(node, ast.Name) and constants and node.id in constants:
        return constants[node.id]
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None  # a name or expression, not a literal


def _declared_inputs(node) -> list[tuple[str, bool]] | None:
    if not isinstance(node, ast.List):
        return None
    inputs = []
    for item in node.elts:  # io.Image.Input("images", ..., optional=True)
        if not (isinstance(item, ast.Call) and _call_name(item.func) == "Input" and item.args):
            return None
        name = _literal(item.args[0])
        if not isinstance(name, str):
            return None
        optional = any(kw.arg == "optional" and _literal(kw.value) is True for kw in item.keywords)
        inputs.append((name, optional))
    return inputs


def _declared_outputs(node) -> list[str] | None:
    if not isinstance(node, ast.List):
        return None
    outputs = []
    for item in node.elts:  # io.Image.Output(...)
        if not (isinstance(item, ast.Call) and _call_name(item.func) == "Output"
                and isinstance(item.func, ast.Attribute) and isinstance(item.func.value, ast.Attribute)):
            return None
        outputs.append(item.func.value.attr)
    return outputs


def io_type_names(comfyui_dir: Path) -> dict[str, str]:
    """{V3 io class name: io type}, e.g. {"Image": "IMAGE", "ClipVision": "CLIP_VISION"}, read from
    ComfyUI's comfy_api/latest/_io.py (the `@comfytype(io_type=...)` decorators)."""
    source = (Path(comfyui_dir) / "comfy_api" / "latest" / "_io.py").read_text()
    names = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and _call_name(decorator.func) == "comfytype":
                    for kw in decorator.keywords:
                        if kw.arg == "io_type" and isinstance(_literal(kw.value), str):
                            names[node.name] = _literal(kw.value)
    return names


# ----------------------------------------------------------------------------------------------------------
# The server


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGKILL the server when the test process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 == PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop() and atexit still stop the server


def _copy_ignore(root: Path):
    def ignore(directory, names):
        skipped = {n for n in names if n in (".git", "__pycache__") or n.endswith(".pyc")}
        if Path(directory) == root:
            skipped |= _SKIPPED_TOP_LEVEL.intersection(names)
        return skipped
    return ignore


def _make_writable(tree: Path) -> None:
    """copytree keeps mode bits; the shared tree is read-only, the copy must not be."""
    for directory, _dirs, files in os.walk(tree):
        os.chmod(directory, os.stat(directory).st_mode | 0o700)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o600)


class ComfyHost:
    """A ComfyUI server in a temp copy, with this repository as custom_nodes/sama.

    Attributes after construction: root (the copy), models_dir, input_dir, output_dir, temp_dir,
    log_path; after start(): port, base_url, startup_seconds.
    """

    def __init__(self, comfyui_dir: Path | str, workdir: Path | str | None = None, pack_dir: Path = REPO,
                 extra_args: tuple[str, ...] = ()):
        self.comfyui_dir = Path(comfyui_dir)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="comfy_host_"))
        self.pack_dir = Path(pack_dir)
        self.extra_args = tuple(extra_args)
        self.root = self.workdir / "ComfyUI"
        self.models_dir = self.root / "models"
        self.input_dir = self.root / "input"
        self.output_dir = self.root / "output"
        self.temp_dir = self.root / "temp"
        self.log_path = self.workdir / "comfyui.log"
        self.port: int | None = None
        self.base_url: str | None = None
        self.startup_seconds: float | None = None
        self.client_id = uuid.uuid4().hex
        self._process: subprocess.Popen | None = None
        self._log_file = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy

    # -- lifecycle ---------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Copy ComfyUI, link the pack, create the model/input/output folders (start() calls it)."""
        if self.root.exists():
            return
        shutil.copytree(self.comfyui_dir, self.root, ignore=_copy_ignore(self.comfyui_dir), symlinks=True)
        _make_writable(self.root)
        (self.root / "custom_nodes").mkdir()
        (self.root / "custom_nodes" / PACK_FOLDER).symlink_to(self.pack_dir, target_is_directory=True)
        for folder in _MODEL_FOLDERS:
            (self.models_dir / folder).mkdir(parents=True, exist_ok=True)
        for folder in (self.input_dir, self.output_dir):
            folder.mkdir(exist_ok=True)

    def start(self, timeout: float = 120.0) -> "ComfyHost":
        """Start the server and wait until /object_info answers; raises ComfyHostError with the log tail."""
        self.prepare()
        started = time.monotonic()
        for _attempt in range(3):
            self._launch(_free_loopback_port())
            try:
                self._wait_until_ready(started + timeout)
                break
            except ComfyHostError:
                port_taken = "address already in use" in self.log_text().lower()
                self.stop()
                if not port_taken:
                    raise
        else:
            raise ComfyHostError(f"could not bind a free loopback port in 3 tries\n{self.log_tail()}")
        self.startup_seconds = time.monotonic() - started
        atexit.register(self.stop)
        return self

    def _launch(self, port: int) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        env = dict(os.environ)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
        # A socket guard in the server process: connections to anything but loopback fail and are recorded.
        guard_dir = self.workdir / "netguard"
        guard_dir.mkdir(parents=True, exist_ok=True)
        (guard_dir / "sitecustomize.py").write_text(NETWORK_GUARD)
        self.network_attempts_path = guard_dir / "attempts.log"
        env["SAMA_NETWORK_GUARD_LOG"] = str(self.network_attempts_path)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(guard_dir), env.get("PYTHONPATH", "")) if p)
        command = [
            sys.executable, "main.py", "--cpu",
            "--listen", "127.0.0.1", "--port", str(port),  # loopback only
            "--disable-auto-launch",
            "--disable-api-nodes",  # cloud API nodes: not needed, and they lengthen start-up
            *self.extra_args,
        ]
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n=== {' '.join(command)}\n".encode())
        self._log_file.flush()
        self._process = subprocess.Popen(
            command, cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)

    def network_attempts(self) -> list[str]:
        """Non-loopback connections the server tried (each refused by the guard)."""
        path = getattr(self, "network_attempts_path", None)
        return path.read_text().splitlines() if path is not None and path.exists() else []

    def _wait_until_ready(self, deadline: float) -> None:
        while True:
            self._check_alive("during start-up")
            try:
                status, _body = self._request("GET", "/object_info", timeout=30)
                if status == 200:
                    return
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            if time.monotonic() > deadline:
                raise ComfyHostError(f"ComfyUI did not answer /object_info in time\n{self.log_tail()}")
            time.sleep(0.25)

    def _check_alive(self, when: str) -> None:
        if self._process is None:
            raise ComfyHostError("the ComfyUI server is not running (call start() first)")
        code = self._process.poll()
        if code is not None:
            raise ComfyHostError(f"ComfyUI exited with code {code} {when}\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and its whole process group. Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        """stop(), then delete the temp copy when this object created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "ComfyHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- logs ----------------------------------------------------------------------------------------

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 80) -> str:
        return "--- ComfyUI log tail ---\n" + "\n".join(self.log_text().splitlines()[-lines:])

    # -- HTTP ----------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, payload=None, timeout: float = 30.0) -> tuple[int, bytes]:
        data = json.dumps(payload).encode() if payload is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get_json(self, path: str, timeout: float = 30.0):
        self._check_alive(f"before GET {path}")
        status, body = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyHostError(f"GET {path} answered HTTP {status}: {body[:2000]!r}")
        return json.loads(body)

    def object_info(self, node_class: str | None = None) -> dict:
        """GET /object_info (every node) or /object_info/<node_class> ({} when unknown)."""
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def pack_nodes(self) -> dict:
        """/object_info entries of the nodes this pack registered (python_module custom_nodes.sama)."""
        return {name: info for name, info in self.object_info().items()
                if info.get("python_module") == PACK_PYTHON_MODULE}

    # -- prompts -------------------------------------------------------------------------------------

    def queue(self, api_prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt; returns the prompt id. Raises PromptRejected when the prompt does not validate."""
        if isinstance(api_prompt.get("nodes"), list):
            raise ValueError("queue() takes an API-format prompt ({id: {class_type, inputs}}), "
                             "got a UI-format workflow (with a 'nodes' list); export it with 'Export (API)'.")
        self._check_alive("before POST /prompt")
        payload = {"prompt": api_prompt, "client_id": client_id or self.client_id}
        status, body = self._request("POST", "/prompt", payload)
        try:
            parsed = json.loads(body)
        except json.JSONDecodeError:
            parsed = {"error": {"message": body.decode(errors="replace")}}
        if status != 200:
            raise PromptRejected(status, parsed)
        return parsed["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.1) -> PromptResult:
        """Poll /history until the prompt finished; returns its PromptResult (ok, error or interrupted).

        On timeout the prompt is interrupted and removed from the queue, then TimeoutError is raised.
        """
        deadline = time.monotonic() + timeout
        while True:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status") or {}
                return PromptResult(
                    prompt_id=prompt_id,
                    status=status.get("status_str", "unknown"),
                    outputs=entry.get("outputs", {}),
                    messages=[tuple(m) for m in status.get("messages", [])],
                    folders={"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir},
                )
            if time.monotonic() > deadline:
                self._request("POST", "/queue", {"delete": [prompt_id]})
                self.interrupt(prompt_id)
                raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, api_prompt: dict, timeout: float = 120.0) -> PromptResult:
        """queue() + wait(); raises PromptRejected (validation) or PromptFailed (error or interrupt)."""
        result = self.wait(self.queue(api_prompt), timeout=timeout)
        if not result.ok:
            raise PromptFailed(result, self.log_tail(40))
        return result

    def wait_until_running(self, prompt_id: str, timeout: float = 60.0) -> None:
        """Block until the prompt is executing (is in /queue's queue_running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = self.get_json("/queue").get("queue_running", [])
            if any(item[1] == prompt_id for item in running):
                return
            if prompt_id in self.get_json(f"/history/{prompt_id}"):
                raise ComfyHostError(f"prompt {prompt_id} already finished before it was seen running")
            time.sleep(0.05)
        raise TimeoutError(f"prompt {prompt_id} did not start running in {timeout} s\n{self.log_tail()}")

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt (the running prompt, or only `prompt_id` if it is the one running)."""
        status, body = self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        if status != 200:
            raise ComfyHostError(f"POST /interrupt answered HTTP {status}: {body[:500]!r}")

    # -- files ---------------------------------------------------------------------------------------

    def model_path(self, folder: str, filename: str) -> Path:
        """Where to write a model file for ComfyUI's `folder` (e.g. "diffusion_models", "vae"); creates the
        folder. ComfyUI re-lists model folders when their mtime changes, so files written while the server
        runs show up in the next /object_info and prompt validation."""
        path = self.models_dir / folder / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def input_path(self, filename: str) -> Path:
        """Where to write an input file (video, image) that LoadVideo / LoadImage will list."""
        path = self.input_dir / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def load_workflow(name: str) -> dict:
    """A workflow JSON from the repository's workflows/ folder."""
    return json.loads((WORKFLOWS_DIR / name).read_text())


# ----------------------------------------------------------------------------------------------------------
# pytest fixture (register with `pytest_plugins = ["comfy_host"]` in a test module)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One ComfyUI server with this pack for the whole test session; skipped when ComfyUI is missing."""
    comfyui_dir = find_comfyui()
    if comfyui_dir is None:
        pytest.skip(skip_reason_without_comfyui())
    # latent2rgb previews: the SAMA Sampler's live previews are part of what the tests check.
    host = ComfyHost(comfyui_dir, workdir=tmp_path_factory.mktemp("comfy_host"),
                     extra_args=("--preview-method", "latent2rgb"))
    try:
        host.start()
        yield host
    finally:
        host.stop()
