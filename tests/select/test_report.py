from bunny.cli import main
from bunny.select.engine import SelectConfig, select


def test_report_table_and_plots(make_input, tmp_path, capsys):
    inp = make_input()
    select(SelectConfig(input=str(inp), out=str(tmp_path / "o"), k=3, progress=False))
    assert main(["data", "report", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "| dedup |" in text and "clip window" in text
    for name in ("cluster_sizes", "component_sizes", "clip_scores", "centroid_cos"):
        assert (tmp_path / "o/report" / f"{name}.png").stat().st_size > 1000
    assert main(["data", "report", str(tmp_path)]) == 2
