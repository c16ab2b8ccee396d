"""conf/mailappliance.service: `systemd-analyze verify` accepts it without a warning, it asks
for what the issue requires, and its ExecStart is a command line twistd understands."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool

CONF = Path(__file__).resolve().parents[2] / "conf"
UNIT = CONF / "mailappliance.service"
INSTALLED_TWISTD = "/opt/mailappliance/bin/twistd"
INSTALLED_COMMAND = "/opt/mailappliance/bin/mailappliance"


def unit_values() -> dict[str, list[str]]:
    """Every key of the unit with all its values (systemd keys may repeat)."""
    values: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


def local_twistd() -> str:
    here = Path(sys.executable).parent / "twistd"
    if here.exists():
        return str(here)
    found = shutil.which("twistd")
    assert found, "twistd is not installed next to the test interpreter"
    return found


def local_command() -> str:
    here = Path(sys.executable).parent / "mailappliance"
    if here.exists():
        return str(here)
    found = shutil.which("mailappliance")
    assert found, "the mailappliance command is not installed next to the test interpreter"
    return found


def verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    tool = require_tool("systemd-analyze")
    unit = tmp_path / "mailappliance.service"
    # Only the install path of the programs differs from the shipped file: verify checks that
    # ExecStart's and ExecReload's programs exist and are executable.
    unit.write_text(text.replace(INSTALLED_TWISTD, local_twistd())
                    .replace(INSTALLED_COMMAND, local_command()))
    return subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


def test_systemd_analyze_verify_accepts_the_unit_without_warnings(tmp_path):
    res = verify(tmp_path, UNIT.read_text())
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr


def test_the_check_would_notice_a_mistake(tmp_path):
    """A misspelt value makes verify complain: the test above can fail."""
    res = verify(tmp_path, UNIT.read_text().replace("KillMode=mixed", "KillMode=gently"))
    assert "kill mode" in res.stderr and "gently" in res.stderr


def test_the_unit_asks_for_what_the_issue_requires():
    v = unit_values()
    assert v["Type"] == ["notify"] and v["NotifyAccess"] == ["main"]
    assert v["Restart"] == ["always"]
    assert v["WatchdogSec"] == ["60s"]
    # the command (exit 1 on a refused reload), on the same configuration as ExecStart
    assert v["ExecReload"] == [f"{INSTALLED_COMMAND} --config "
                               "/etc/mailappliance/mailappliance.toml reload"]
    # socket_group members and every user's sendmail must reach the sockets in it
    assert v["RuntimeDirectoryMode"] == ["0755"]
    assert v["ProtectProc"] == ["invisible"] and v["ProcSubset"] == ["pid"]
    assert v["Documentation"]
    # the restart comment says what the settings do
    text = UNIT.read_text()
    assert "5 s after" in text and v["RestartSec"] == ["5s"]
    assert v["StartLimitBurst"] == ["5"] and v["StartLimitIntervalSec"] == ["300s"]
    assert v["NoNewPrivileges"] == ["yes"]
    assert v["ProtectSystem"] == ["strict"]
    assert v["ReadWritePaths"] == ["/var/lib/mailappliance"]
    assert v["PrivateTmp"] == ["yes"]
    assert v["MemoryMax"] == ["512M"]
    caps = v["CapabilityBoundingSet"][0].split()
    assert "CAP_NET_BIND_SERVICE" in caps
    # nothing beyond the root phase's needs (bind, switch ids, read and hand over the data dir)
    assert set(caps) <= {"CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID",
                         "CAP_DAC_OVERRIDE", "CAP_CHOWN"}
    # stopping takes the drain (30 s) plus the queue and pool; systemd must wait longer
    assert int(v["TimeoutStopSec"][0].rstrip("s")) > 30


def exec_start() -> list[str]:
    return shlex.split(unit_values()["ExecStart"][0])


def test_exec_start_is_a_twistd_command_line_twistd_accepts(tmp_path):
    argv = exec_start()
    assert argv[0] == INSTALLED_TWISTD
    assert "--nodaemon" in argv and "--uid=mailappliance" in argv and "--gid=mailappliance" in argv
    i = argv.index("mailappliance")
    assert argv[i + 1:] == ["--config", "/etc/mailappliance/mailappliance.toml"]
    # Parse it with twistd's own option parser, with a config that exists here and ids that
    # exist here (root) in place of the production ones.
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'data = "{tmp_path / "var"}"\n')
    args = [a.replace("/etc/mailappliance/mailappliance.toml", str(cfg))
            .replace("--uid=mailappliance", "--uid=root")
            .replace("--gid=mailappliance", "--gid=root") for a in argv[1:]]
    from twisted.scripts.twistd import ServerOptions
    from mailappliance.logging import journal
    options = ServerOptions()
    options.parseOptions(args)
    assert options["nodaemon"] and options["uid"] == 0 and options["gid"] == 0
    assert options["logger"] is journal
    assert options.subCommand == "mailappliance"
    assert options.subOptions.settings.data == tmp_path / "var"


@pytest.mark.parametrize("key", ["Type", "Restart", "WatchdogSec", "ProtectSystem"])
def test_configparser_reads_the_unit_the_same_way(key):
    """The unit is plain ini: a second reader agrees with ours (catches stray continuation
    lines and misplaced sections)."""
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string(UNIT.read_text())
    assert cp["Service"][key] == unit_values()[key][0]


def test_systemd_analyze_security_finds_no_proc_exposure(tmp_path):
    """`systemd-analyze security` no longer flags /proc (ProtectProc=, ProcSubset=) nor mount
    propagation (PrivateMounts=), and the overall exposure stays "OK" or better."""
    tool = require_tool("systemd-analyze")
    unit = tmp_path / "mailappliance.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_TWISTD, local_twistd())
                    .replace(INSTALLED_COMMAND, local_command()))
    res = subprocess.run([tool, "security", "--offline=yes", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    flagged = [line.split()[1] for line in res.stdout.splitlines()
               if line.startswith("\u2717")]
    assert "ProtectProc=" not in flagged and "ProcSubset=" not in flagged, res.stdout
    assert "PrivateMounts=" not in flagged, res.stdout
    level = res.stdout.strip().splitlines()[-1]
    exposure = float(level.split(":")[1].split()[0])
    assert exposure <= 3.0, level


def test_exec_reload_is_a_command_line_the_cli_accepts():
    from mailappliance.cli import build_parser
    argv = shlex.split(unit_values()["ExecReload"][0])
    args = build_parser().parse_args(argv[1:])
    assert args.area == "reload" and args.config == "/etc/mailappliance/mailappliance.toml"
