"""The command line, as users run it: real subprocesses of `python uni_api.py`, bound to 127.0.0.1 only.

Every started server is terminated in a `finally`; no test leaves a process behind.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import FakeUpstream, free_port

import uni_api

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "uni_api.py"
EXAMPLE = ROOT / "api.yaml.example"
KEY = "sk-cli-client"
READY_TIMEOUT = 10.0

CONFIG = f"""\
providers:
  - provider: local
    base_url: http://127.0.0.1:9/v1/chat/completions
    api: sk-upstream-secret
    model:
      - gpt-4o
      - up-model: renamed
api_keys:
  - api: {KEY}
"""
BROKEN = "providers:\n  - provider: p\n    base_url: not-a-url\napi_keys:\n  - api: sk-a\n"


def cli_env(**extra: str) -> dict[str, str]:
    """The test's environment without the variables the CLI reads, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CONFIG_URL", "HOST", "PORT", "TIMEOUT", "DEBUG", "DB_PATH")}
    env["DISABLE_DATABASE"] = "true"
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env or cli_env(), capture_output=True,
                          text=True, timeout=30)


def stderr_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed start prints."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def serving(*args: str, port: int, cwd: Path = ROOT, env: dict[str, str] | None = None,
            log: Path) -> Iterator[httpx.Client]:
    """Start the CLI, wait until GET /healthz answers, yield a client for it, always terminate it."""
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env or cli_env(),
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2) as client:
            deadline = time.monotonic() + READY_TIMEOUT
            while True:
                if process.poll() is not None:
                    pytest.fail(f"uni-api exited with {process.returncode}:\n{log.read_text()}")
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"uni-api was not ready within {READY_TIMEOUT} s:\n{log.read_text()}")
                time.sleep(0.05)
            yield client
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def assert_serves_the_config(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200  # no key needed
    assert client.get("/v1/models").status_code == 401
    response = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["gpt-4o", "renamed"]


# --- Version and --check-config ---


def test_version_prints_the_version_file_and_exits_zero() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    version = (ROOT / "VERSION").read_text().strip()
    assert result.stdout.startswith(f"uni-api {version} ") or result.stdout.strip() == f"uni-api {version}"
    assert version == uni_api.VERSION


def test_check_config_accepts_the_example_and_names_its_providers() -> None:
    placeholders = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", EXAMPLE.read_text()))
    env = {k: v for k, v in cli_env().items() if k not in placeholders}
    result = run_cli("--check-config", "--config", "api.yaml.example", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "api.yaml.example: OK"
    for name in re.findall(r"^  - provider: (\S+)", EXAMPLE.read_text(), re.M):
        assert f"provider {name} " in result.stdout
    assert "sk-user-replace-me" not in result.stdout  # keys are shown by a short label only
    lines = EXAMPLE.read_text().splitlines()
    placeholder = re.compile(r"[:-] \$\{\w+:-[\w-]*replace-me[\w-]*\}(/\*)?\s*(#|$)")  # a value, or a rule naming one
    left = [i + 1 for i, line in enumerate(lines) if placeholder.search(line)]
    warnings = result.stderr.splitlines()
    assert len(left) > 10 and [int(w.split(":")[2]) for w in warnings] == left
    assert all(re.fullmatch(r"warning: api\.yaml\.example:\d+: \S+ is still the example's placeholder \(replace-me\)",
                            w) for w in warnings), warnings
    assert "warning: api.yaml.example:16: providers[0].api is" in result.stderr


def test_check_config_refuses_a_broken_config_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BROKEN)
    result = run_cli("--check-config", "--config", str(tmp_path / "bad.yaml"))
    assert result.returncode == 1
    assert stderr_line(result) == "error: bad.yaml:3: providers[0].base_url: expected a URL"
    assert result.stdout == ""


def test_a_bad_config_never_starts_a_server(tmp_path: Path) -> None:
    (tmp_path / "api.yaml").write_text(BROKEN)
    port = free_port()
    result = run_cli("--config", str(tmp_path / "api.yaml"), "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == uni_api.STARTUP_FAILURE == 3
    assert stderr_line(result) == "error: api.yaml:3: providers[0].base_url: expected a URL"
    assert not listening(port)


@pytest.mark.parametrize(("flags", "code"), [(("--check-config",), 1), (("--host", "127.0.0.1"), 3)])
def test_a_missing_config_file_is_one_clear_line(tmp_path: Path, flags: tuple[str, ...], code: int) -> None:
    missing = tmp_path / "nowhere.yaml"
    result = run_cli(*flags, "--config", str(missing), "--port", str(free_port()))
    assert result.returncode == code
    assert stderr_line(result) == f"error: {missing}: cannot read the config: No such file or directory"


def test_without_config_and_without_api_yaml_in_the_working_directory_it_says_so(tmp_path: Path) -> None:
    result = run_cli("--host", "127.0.0.1", "--port", str(free_port()), cwd=tmp_path)
    assert result.returncode == 3
    assert stderr_line(result) == "error: api.yaml: cannot read the config: No such file or directory"


def test_a_port_variable_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    result = run_cli("--check-config", env=cli_env(PORT="eighty"), cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --port: invalid int value: 'eighty'" in result.stderr
    assert "Traceback" not in result.stderr


# --- Starting for real ---


def test_flags_choose_config_host_and_port(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    port = free_port()
    env = cli_env(CONFIG_URL=str(tmp_path / "not-this-one.yaml"))  # --config wins over CONFIG_URL
    with serving("--config", str(tmp_path / "cfg.yaml"), "--host", "127.0.0.1", "--port", str(port), port=port,
                 env=env, log=tmp_path / "log") as client:
        assert_serves_the_config(client)


def test_host_and_port_come_from_the_environment_without_flags(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    port = free_port()
    env = cli_env(HOST="127.0.0.1", PORT=str(port))
    with serving("--config", str(tmp_path / "cfg.yaml"), port=port, env=env, log=tmp_path / "log") as client:
        assert_serves_the_config(client)


def test_config_url_may_be_a_local_path(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    port = free_port()
    env = cli_env(CONFIG_URL=str(tmp_path / "cfg.yaml"))
    with serving("--host", "127.0.0.1", "--port", str(port), port=port, env=env, log=tmp_path / "log") as client:
        assert_serves_the_config(client)


def test_config_url_may_be_an_http_url(tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.enqueue(body=CONFIG.encode(), content_type="text/yaml")
    port = free_port()
    env = cli_env(CONFIG_URL=f"{upstream.url}/configs/api.yaml")
    with serving("--host", "127.0.0.1", "--port", str(port), port=port, env=env, log=tmp_path / "log") as client:
        assert_serves_the_config(client)
    assert [(r.method, r.path) for r in upstream.received] == [("GET", "/configs/api.yaml")]


def test_without_config_it_reads_api_yaml_in_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "api.yaml").write_text(CONFIG)
    port = free_port()
    with serving("--host", "127.0.0.1", "--port", str(port), port=port, cwd=tmp_path,
                 log=tmp_path / "log") as client:
        assert_serves_the_config(client)


def test_environment_placeholders_are_filled_when_starting(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text(CONFIG.replace(KEY, "${UNI_API_CLI_KEY:-sk-unused}"))
    port = free_port()
    env = cli_env(UNI_API_CLI_KEY=KEY)
    with serving("--config", str(tmp_path / "cfg.yaml"), "--host", "127.0.0.1", "--port", str(port), port=port,
                 env=env, log=tmp_path / "log") as client:
        assert_serves_the_config(client)


# --- Config URLs that fail ---


def test_a_config_url_answering_404_is_one_clear_line(upstream: FakeUpstream) -> None:
    upstream.enqueue(status=404, body=b"not here", content_type="text/plain")
    url = f"{upstream.url}/api.yaml"
    result = run_cli("--config", url, "--host", "127.0.0.1", "--port", str(free_port()))
    assert result.returncode == 3
    assert stderr_line(result) == f"error: {url}: could not fetch the config: HTTP 404"


def test_a_config_url_larger_than_the_fetch_limit_is_refused(upstream: FakeUpstream) -> None:
    # A valid config padded with a comment: were only a prefix read, it would parse and start.
    body = CONFIG.encode() + b"#" + b"x" * uni_api.CONFIG_FETCH_LIMIT + b"\n"
    upstream.enqueue(body=body, content_type="text/yaml")
    url = f"{upstream.url}/api.yaml"
    port = free_port()
    result = run_cli("--config", url, "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 3
    assert stderr_line(result) == f"error: {url}: the config is larger than {uni_api.CONFIG_FETCH_LIMIT} bytes"
    assert not listening(port)


def test_a_config_url_nobody_answers_is_one_clear_line() -> None:
    url = f"http://127.0.0.1:{free_port()}/api.yaml"
    result = run_cli("--check-config", "--config", url)
    assert result.returncode == 1
    assert stderr_line(result).startswith(f"error: {url}: could not fetch the config: ")


def test_a_config_served_over_http_is_checked_like_a_file(upstream: FakeUpstream) -> None:
    upstream.enqueue(body=BROKEN.encode(), content_type="text/yaml")
    url = f"{upstream.url}/api.yaml"
    result = run_cli("--check-config", "--config", url)
    assert result.returncode == 1
    assert stderr_line(result) == f"error: {url}:3: providers[0].base_url: expected a URL"


# --- The start-up line ---


def test_the_client_address_shows_loopback_for_a_wildcard_bind() -> None:
    assert uni_api.client_address("0.0.0.0", 8000) == "http://127.0.0.1:8000/v1"
    assert uni_api.client_address("::", 8000) == "http://[::1]:8000/v1"
    assert uni_api.client_address("127.0.0.1", 9) == "http://127.0.0.1:9/v1"
    assert uni_api.client_address("gw.example", 80) == "http://gw.example:80/v1"


def read_stderr_until(process: subprocess.Popen[str], pattern: str, timeout: float = READY_TIMEOUT) -> list[str]:
    """Lines of the process's stderr up to and including the first matching `pattern`."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            if re.search(pattern, line):
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        pytest.fail(f"no line matching {pattern!r} within {timeout} s:\n" + "\n".join(lines))
    return lines


def test_a_start_says_in_one_line_what_serves_where_and_warns_of_placeholder_keys(tmp_path: Path) -> None:
    config = CONFIG.replace("api: sk-upstream-secret", "api: ${UNI_API_TEST_UP_KEY:-sk-replace-me}")
    (tmp_path / "cfg.yaml").write_text(config)
    port, db = free_port(), tmp_path / "stats.db"
    env = {**cli_env(DB_PATH=str(db))}
    env.pop("DISABLE_DATABASE")
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(tmp_path / "cfg.yaml"), "--host",
                                "127.0.0.1", "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        lines = read_stderr_until(process, r" serving ")
        started = [line for line in lines if " serving " in line]
        address = f"http://127.0.0.1:{port}/v1"
        speedups = ", ".join(uni_api.speedups()) or "none"
        assert len(started) == 1 and started[0].endswith(
            f"INFO uni_api: uni-api {uni_api.VERSION} serving {address} (1 provider, 2 models, 1 client key; "
            f"stats: {db}; speedups: {speedups})"), lines
        warnings = [line for line in lines if "WARNING" in line]
        assert len(warnings) == 1 and warnings[0].endswith(
            "WARNING uni_api: cfg.yaml:4: providers[0].api is still the example's placeholder (replace-me): "
            "put your own value there"), lines
        response = httpx.get(f"{address}/models", headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 200  # the address printed is the one to use
    finally:
        process.terminate()
        assert process.wait(5) == 0


def test_check_config_names_a_missing_credential_with_file_line_and_key(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text("providers:\n  - provider: cf\n    engine: cloudflare\n    api: t\n"
                                       "    model: [m]\napi_keys:\n  - api: sk-a\n")
    result = run_cli("--check-config", "--config", str(tmp_path / "cfg.yaml"))
    assert result.returncode == 1
    assert stderr_line(result) == ("error: cfg.yaml:2: providers[0].cf_account_id: missing required key "
                                   "'cf_account_id' (engine cloudflare needs it)")


@contextmanager
def started_argv(command: list[str], port: int, cwd: Path, env: dict[str, str]) -> Iterator[list[str]]:
    """Start `command` (a gateway on `port`), wait until it listens, yield its /proc cmdline, terminate it."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + READY_TIMEOUT * 3  # a trace hook slows the start
        while not listening(port):
            assert process.poll() is None and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        yield Path(f"/proc/{process.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}
                         ).status_code == 200
    finally:
        process.terminate()
        assert process.wait(5) == 0


NEEDS_PROC = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc/<pid>/cmdline")


@NEEDS_PROC
def test_run_as_a_script_it_re_executes_as_an_import_keeping_pid_flags_and_arguments(tmp_path: Path) -> None:
    """CPython holds a script's syntax tree until the script returns: the server must not run inside it."""
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    port = free_port()
    args = ["--config", str(tmp_path / "cfg.yaml"), "--host", "127.0.0.1", "--port", str(port)]
    command = [sys.executable, "-X", "faulthandler", str(SCRIPT), *args]
    with started_argv(command, port, tmp_path, cli_env()) as argv:
        assert argv[:4] == [sys.executable, "-X", "faulthandler", "-c"]
        assert "import uni_api" in argv[4]
        assert argv[5:] == [str(SCRIPT), *args]


@NEEDS_PROC
def test_uni_api_no_reexec_keeps_the_script_process_as_started(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    port = free_port()
    command = [sys.executable, str(SCRIPT), "--config", str(tmp_path / "cfg.yaml"), "--host", "127.0.0.1",
               "--port", str(port)]
    with started_argv(command, port, tmp_path, cli_env(UNI_API_NO_REEXEC="1")) as argv:
        assert argv == command


# A driver runs the script as `python uni_api.py` would (runpy.run_path gives __name__ "__main__" and no
# __spec__), after installing what a debugger, coverage or a profiler installs.
_DRIVER = ("import os, runpy, sys; {setup}; sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
           "runpy.run_path(sys.argv[0], run_name='__main__')")


@NEEDS_PROC
@pytest.mark.parametrize("setup", [
    "sys.settrace(lambda *event: None)",  # a debugger or coverage's tracer
    "sys.setprofile(lambda *event: None)",  # a profiler
    "import cProfile",  # a profiler's module, hook not yet set
    "import pdb",  # a debugger's module
])
def test_under_a_debugger_coverage_or_profiler_it_does_not_re_execute(tmp_path: Path, setup: str) -> None:
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    port = free_port()
    driver = _DRIVER.format(setup=setup)
    command = [sys.executable, "-c", driver, str(SCRIPT), "--config", str(tmp_path / "cfg.yaml"),
               "--host", "127.0.0.1", "--port", str(port)]
    with started_argv(command, port, tmp_path, cli_env()) as argv:
        assert argv == command  # re-executed, it would read [python, -c, "...import uni_api...", ...]


def test_a_symlink_to_the_script_runs_the_uni_api_it_points_to(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "uni-api.py").symlink_to(SCRIPT)
    result = subprocess.run([sys.executable, str(tmp_path / "bin" / "uni-api.py"), "--check-config", "--config",
                             str(tmp_path / "cfg.yaml")], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{tmp_path / 'cfg.yaml'}: OK")
