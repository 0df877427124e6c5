"""The browser helper never installs anything: without chromium it fails with the command that installs it."""
import shutil
import subprocess

import pytest

import chromium_page


def test_missing_chromium_names_the_install_command_and_installs_nothing(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    for name in ("run", "Popen", "call", "check_call"):
        monkeypatch.setattr(subprocess, name, lambda *a, **k: pytest.fail("the helper ran a command"))
    with pytest.raises(chromium_page.ChromiumMissing, match="make browser .*apt-get install -y chromium"):
        chromium_page.chromium_binary()
