"""supervisord as the stack's process manager: config file, start, RPC, shutdown.

supervisord (from PyPI) restarts crashed children, keeps one log per child and
answers status over a unix socket, which is all the one-machine stack needs; we
talk to it through its XML-RPC interface rather than parsing ``supervisorctl``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from supervisor.xmlrpc import SupervisorTransport

from stack.components import Component
from stack.credentials import write_private


@dataclass(frozen=True)
class ProcessState:
    name: str
    state: str
    pid: int
    description: str


def _quote(name: str, value: str) -> str:
    """The ``environment=`` value of variable ``name`` as supervisord reads it back.

    supervisord splits the line with a non-POSIX shlex (no backslash escapes: a quote
    ends the token) and then strips quotes from both ends; it expands %(name)s, so a
    literal % is doubled. A value holding double quotes (JSON settings such as
    CXR_PACS_DESTINATIONS) therefore goes in single quotes, and one that starts or ends
    with a quote, or holds both kinds, cannot be passed at all: refuse it clearly, by the
    variable's name only: these values are secrets (S3 keys, PACS Authorization headers), and the
    message reaches the console and logs of ``cxr stack up``.
    """
    escaped = value.replace("%", "%%")
    if '"' not in value:
        return f'"{escaped}"'
    if "'" in value or value[:1] in "\"'" or value[-1:] in "\"'":
        raise ValueError(
            f"supervisord cannot carry the value of {name}: it starts or ends with a quote, or holds "
            "both single and double quotes"
        )
    return f"'{escaped}'"


def render_config(state: Path, components: list[Component]) -> str:
    """supervisord.conf for the given components; logs in ``state/logs``."""
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sections = [
        "[unix_http_server]",
        f"file={state / 'supervisor.sock'}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"logfile={logs / 'supervisord.log'}",
        f"pidfile={state / 'supervisord.pid'}",
        f"directory={Path.cwd()}",
        "logfile_maxbytes=5MB",
        "logfile_backups=1",
        # every component inherits it: what they write (results, spools, logs, databases) is the
        # owner's alone, whatever the login shell's umask
        "umask=077",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{state / 'supervisor.sock'}",
        "",
    ]
    for comp in components:
        env = ",".join(f"{k}={_quote(k, v)}" for k, v in sorted(comp.env.items()))
        sections += [
            f"[program:{comp.name}]",
            "command=" + " ".join(_shell_word(w) for w in comp.command),
            f"directory={comp.cwd or Path.cwd()}",
            "autostart=true",
            "autorestart=true",
            f"startsecs={comp.startsecs}",
            "startretries=3",
            f"stopsignal={comp.stop_signal}",
            "stopwaitsecs=20",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={logs / (comp.name + '.log')}",
            "stdout_logfile_maxbytes=10MB",
            "stdout_logfile_backups=1",
        ]
        if env:
            sections.append(f"environment={env}")
        sections.append("")
    return "\n".join(sections)


def _shell_word(word: str) -> str:
    # supervisord splits the command with shlex; quote words with spaces, escape %.
    word = word.replace("%", "%%")
    return f'"{word}"' if any(c.isspace() for c in word) else word


class Supervisor:
    """The stack's supervisord: one per state folder."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.config = state / "supervisord.conf"
        self.socket = state / "supervisor.sock"
        self.pidfile = state / "supervisord.pid"

    def _rpc(self) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def running(self) -> bool:
        if self.pid() is None:
            return False
        try:
            return cast(str, self._rpc().supervisor.getState()["statename"]) == "RUNNING"
        except (OSError, xmlrpc.client.Fault):
            return False

    def write_config(self, components: list[Component]) -> None:
        # it holds the S3 secret and Orthanc's auth header in environment= lines: 0600 from the start
        write_private(self.config, render_config(self.state, components))

    def start(self) -> None:
        """Start supervisord (it daemonizes) and wait until its RPC answers."""
        subprocess.run(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.config)],
            check=True,
            env=os.environ.copy(),
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.running():
                return
            time.sleep(0.1)
        raise RuntimeError(f"supervisord did not start; see {self.state / 'logs' / 'supervisord.log'}")

    def update(self) -> None:
        """Apply a changed config to a running supervisord (like ``supervisorctl update``)."""
        rpc = self._rpc()
        added, changed, removed = rpc.supervisor.reloadConfig()[0]
        for name in removed + changed:
            with contextlib.suppress(xmlrpc.client.Fault):
                rpc.supervisor.stopProcessGroup(name)
            rpc.supervisor.removeProcessGroup(name)
        for name in added + changed:
            rpc.supervisor.addProcessGroup(name)
        rpc.supervisor.startAllProcesses(False)

    def processes(self) -> list[ProcessState]:
        if not self.running():
            return []
        return [
            ProcessState(p["name"], p["statename"], int(p["pid"]), p["description"])
            for p in self._rpc().supervisor.getAllProcessInfo()
        ]

    def process_state(self, name: str) -> ProcessState | None:
        return next((p for p in self.processes() if p.name == name), None)

    def stop_process(self, name: str) -> None:
        """Stop one component (it stays stopped until :meth:`start_process`)."""
        self._rpc().supervisor.stopProcess(name, True)

    def start_process(self, name: str) -> None:
        self._rpc().supervisor.startProcess(name, True)

    def shutdown(self, timeout: float = 60.0) -> list[int]:
        """Stop every child, then supervisord; return child PIDs that were running."""
        pids = [p.pid for p in self.processes() if p.pid]
        pid = self.pid()
        if pid is None:
            return pids
        try:
            self._rpc().supervisor.stopAllProcesses(True)
            self._rpc().supervisor.shutdown()
        except (OSError, xmlrpc.client.Fault):
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.1)
        return pids
