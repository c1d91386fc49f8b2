"""``ciliate cni install``: the shim and the conflist, written atomically."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from ciliate.control.cni import install as cni_install
from ciliate.datapath import objects


def test_install_copies_the_shim_and_writes_the_conflist(shim: Path, tmp_path: Path) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"

    written = cni_install.install(
        bin_dir=bin_dir, conf_dir=conf_dir, socket="/run/lab/agent.sock", shim=shim
    )

    binary, conf = bin_dir / "ciliate-cni", conf_dir / "05-ciliate.conflist"
    assert written == [binary, conf]
    assert binary.read_bytes() == shim.read_bytes()
    assert stat.S_IMODE(binary.stat().st_mode) == 0o755
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    assert json.loads(conf.read_text()) == {
        "cniVersion": "1.0.0",
        "name": "ciliate",
        "plugins": [
            {
                "type": "ciliate-cni",
                "capabilities": {"portMappings": True, "bandwidth": True},
                "agentSocket": "/run/lab/agent.sock",
            }
        ],
    }
    assert sorted(os.listdir(bin_dir)) == ["ciliate-cni"]  # no temporary files left
    assert sorted(os.listdir(conf_dir)) == ["05-ciliate.conflist"]


def test_the_default_socket_is_left_out_of_the_conflist(shim: Path, tmp_path: Path) -> None:
    cni_install.install(
        bin_dir=tmp_path,
        conf_dir=tmp_path,
        socket=None,
        network_name="podnet",
        cni_version="1.1.0",
        shim=shim,
    )
    conf = json.loads((tmp_path / "05-ciliate.conflist").read_text())
    assert conf == {
        "cniVersion": "1.1.0",
        "name": "podnet",
        "plugins": [
            {"type": "ciliate-cni", "capabilities": {"portMappings": True, "bandwidth": True}}
        ],
    }


def test_the_installed_plugin_runs(shim: Path, tmp_path: Path) -> None:
    cni_install.install(bin_dir=tmp_path, conf_dir=tmp_path, socket=None, shim=shim)
    proc = subprocess.run(
        [str(tmp_path / "ciliate-cni")],
        input=b'{"cniVersion": "1.0.0"}',
        env={"CNI_COMMAND": "VERSION"},
        capture_output=True,
        check=True,
    )
    assert json.loads(proc.stdout)["cniVersion"] == "1.0.0"


def test_installing_again_replaces_a_running_plugin(shim: Path, tmp_path: Path) -> None:
    cni_install.install(bin_dir=tmp_path, conf_dir=tmp_path, socket=None, shim=shim)
    running = subprocess.Popen(
        [str(tmp_path / "ciliate-cni")], stdin=subprocess.PIPE, env={"CNI_COMMAND": "VERSION"}
    )
    try:  # writing over an executing binary in place would fail with ETXTBSY
        cni_install.install(bin_dir=tmp_path, conf_dir=tmp_path, socket=None, shim=shim)
    finally:
        running.communicate(b"{}", timeout=10)
    assert (tmp_path / "ciliate-cni").read_bytes() == shim.read_bytes()


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"socket": "agent.sock"}, "absolute path"),
        ({"socket": "/" + "x" * 107}, "at most 107 bytes"),
        ({"network_name": "my net"}, "network name"),
        ({"cni_version": "0.2.0"}, "cniVersion '0.2.0'"),
    ],
    ids=["relative socket", "socket too long", "network name with a blank", "old cniVersion"],
)
def test_install_refuses(
    shim: Path, tmp_path: Path, arguments: dict[str, str], fragment: str
) -> None:
    with pytest.raises(cni_install.InstallError, match=fragment):
        cni_install.install(
            bin_dir=tmp_path,
            conf_dir=tmp_path,
            socket=arguments.get("socket"),
            network_name=arguments.get("network_name", "ciliate"),
            cni_version=arguments.get("cni_version", "1.0.0"),
            shim=shim,
        )
    assert os.listdir(tmp_path) == []


def test_a_missing_shim_says_how_to_build_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(objects, "dev_build_dir", lambda: tmp_path / "build")
    # An editable install also carries a packaged copy: hide it too.
    monkeypatch.setattr(cni_install.importlib.resources, "files", lambda _: tmp_path / "pkg")
    with pytest.raises(cni_install.InstallError, match="ciliate bpf build"):
        cni_install.find_shim()


def test_the_shim_is_found_in_the_dev_build(shim: Path) -> None:
    if objects.dev_build_dir() is None or shim.parent.parent != objects.dev_build_dir():
        pytest.skip("the shim fixture did not come from build/dev")
    assert cni_install.find_shim() == shim


def test_cni_install_is_a_subcommand(
    shim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cni_install, "find_shim", lambda: shim)
    parser = argparse.ArgumentParser(prog="ciliate")
    cni_install.register(parser.add_subparsers(dest="command", required=True))

    args = parser.parse_args(
        f"cni install --bin-dir {tmp_path}/bin --conf-dir {tmp_path}/conf"
        " --socket /run/x/agent.sock --name lab".split()
    )

    assert args.func(args) == 0
    assert "05-ciliate.conflist" in capsys.readouterr().out
    conf = json.loads((tmp_path / "conf" / "05-ciliate.conflist").read_text())
    assert conf["name"] == "lab"
    assert conf["plugins"][0]["agentSocket"] == "/run/x/agent.sock"


def test_cni_install_reports_errors_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="ciliate")
    cni_install.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        f"cni install --bin-dir {tmp_path} --conf-dir {tmp_path} --socket relative.sock".split()
    )
    assert args.func(args) == 1
    assert "absolute path" in capsys.readouterr().err
