"""Issue 20, item 3: the loss plot of a run shorter than run.log_every shows its one logged point."""

from tests.train.test_pretrain import emoji_root, small_config  # noqa: F401 - fixture
from vtp_fast import plots
from vtp_fast.train.pretrain import pretrain


def test_loss_plot_shows_a_run_shorter_than_log_every(emoji_root, tmp_path, monkeypatch):  # noqa: F811
    drawn, close = [], plots.plt.close
    monkeypatch.setattr(plots.plt, "close", lambda fig: (drawn.append(fig), close(fig)))
    out = tmp_path / "run"
    paths = pretrain(small_config(emoji_root, out, "run.steps=2", "run.log_every=10", "run.eval_every=10"))
    (fig,) = [f for f in drawn if f.axes[0].get_title().endswith("loss terms")]
    lines = fig.axes[0].get_lines()
    assert paths["loss_curves"] == out / "loss.png" and paths["loss_curves"].exists()
    assert {line.get_label() for line in lines} >= {"total", "clip", "dino", "ibot", "rec_l1"}
    for line in lines:  # the last step, logged although 2 is not a multiple of 10, drawn as a visible marker
        assert list(line.get_xdata()) == [2] and line.get_marker() == "o", line.get_label()
