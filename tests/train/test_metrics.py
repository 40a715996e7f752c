import torch

from keye.train.metrics import MetricsLog, plot_curves


def test_log_resume_drops_rows_past_checkpoint_and_plots(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 6):
        log.log(step, loss=torch.tensor(1.0 / step), lr=0.1)
    resumed = MetricsLog(tmp_path, resume_step=3)  # the run died after step 5, its checkpoint was at 3
    resumed.log(4, loss=0.2)
    rows = resumed.rows()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["loss"] == 1.0 and rows[-1]["loss"] == 0.2
    png = plot_curves(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_fresh_log_starts_empty(tmp_path):
    MetricsLog(tmp_path).log(1, loss=1.0)
    assert MetricsLog(tmp_path).rows() == []
    assert plot_curves(tmp_path) is None
