"""The transfer study on a small labelled set: every bias gets its row, and evaluating at the training size and
window through the transfer path gives exactly the accuracy measured before it."""

from test_probe import _classes

from simmim.transfer import main


def test_each_bias_trains_transfers_and_the_same_window_is_the_same_model(tmp_path, capsys):
    root = str(_classes(tmp_path / "coded", colour_coded=True, per_class=10))
    args = ["--data.root", root, "--img_size", "32", "--window", "4", "--eval", "32:4", "64:8", "--epochs", "2"]
    args += ["--finetune_epochs", "1", "--embed_dim", "24", "--depths", "2", "2", "--num_heads", "2", "4"]
    results = main(args + ["--out", str(tmp_path / "t.md")])
    assert set(results) == {"table", "linear_cpb", "log_cpb"}
    for row in results.values():
        assert row["32/w4 zero-shot"] == row["32/w4"]  # the saved and rebuilt model is the trained one
        assert all(0.0 <= v <= 100.0 for v in row.values()) and len(row) == 5
    out = capsys.readouterr().out
    assert "| position bias | 32/w4 | 32/w4 zero-shot | 32/w4 fine-tuned | 64/w8 zero-shot | 64/w8 fine-tuned |" in out
    assert (tmp_path / "t.md").read_text().count("\n") == 5
