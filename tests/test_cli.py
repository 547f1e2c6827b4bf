"""The console script: `picomaml info` and `picomaml sample`."""

from __future__ import annotations

from picomaml.cli import main


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("picomaml", "torch", "transformers", "lightning", "higher", "learn2learn"):
        assert name in out


def test_sample_prints_decoded_episodes(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PICOMAML_CACHE", str(tmp_path))
    assert main(["sample", "--n", "2", "--n-way", "3", "--k-shot", "2", "--n-query", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== episode") == 2
    assert out.count("label 0: class token") == 2 and "label 2: class token" in out
    assert out.count("  support |") == 2 * 3 * 2 and out.count("  query   |") == 2 * 3 * 1
    assert "[MASK]" in out
