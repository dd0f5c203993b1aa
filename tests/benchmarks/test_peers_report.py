"""benchmarks.peers_report: ratios against splitserve and the plot, from the committed run."""

from pathlib import Path

from benchmarks.peers_report import plot, read_runs, table

RUN = Path(__file__).resolve().parents[2] / "docs" / "peers" / "peers.jsonl"


def test_table_gives_splitserve_ratios_against_each_peer():
    runs = read_runs(RUN)
    assert runs[0].label == "splitserve" and len(runs) >= 2
    text = table(runs)
    peer = runs[1]
    expected = f"{runs[0].streams_tok_s / peer.streams_tok_s:.2f}x"
    assert f"| {peer.label} |" in text and expected in text.splitlines()[3]


def test_plot_writes_a_png(tmp_path):
    out = plot(read_runs(RUN), tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
