"""The demo's data: Fashion-MNIST when it is installed, else scikit-learn's digits, and the fallback is said
once on the console and once in log.txt. `data.root` points the loader at a folder of our choosing."""
import gzip
import struct

import numpy as np

from pipelines.arrays import ArrayDataConfig, load_arrays
from sct import stats, train

FALLBACK = "falling back to scikit-learn's 8x8 digits"


def test_demo_fallback_is_announced_on_the_console_and_in_the_log(tmp_path, capsys):
    empty, run_dir = tmp_path / "no-fashion-mnist", tmp_path / "run"
    empty.mkdir()
    args = ["--config", "configs/demo_cpu.yaml", f"run.dir={run_dir}", f"data.root={empty}", "run.total_steps=1",
            "run.batch_size=8", "sampling.num=10", "sampling.steps=[1]"]
    assert train.main(args) == 0
    console = capsys.readouterr().err
    assert console.count(FALLBACK) == 1 and str(empty) in console
    log = (run_dir / "log.txt").read_text()
    assert log.count(FALLBACK) == 1
    assert "data: digits train, 1797 samples of shape (1, 16, 16)" in log


def _idx(path, array: np.ndarray) -> None:
    """IDX file as Debian's dataset-fashion-mnist ships it: magic (0, 0, uint8=8, ndim), big-endian dims, data."""
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes())


def test_fashion_mnist_at_data_root_is_used_without_a_fallback_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    _idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28), dtype=np.uint8))
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(12, dtype=np.uint8) % 10)
    stats.setup_logging(None)
    x, labels = load_arrays(ArrayDataConfig(root=str(tmp_path)))
    assert x.shape == (12, 1, 16, 16) and labels.argmax(1).tolist() == [i % 10 for i in range(12)]
    assert x[:, :, 0].eq(-1).all() and x.min() >= -1 and x.max() <= 1  # 14x14 padded with -1 to 16x16
    assert FALLBACK not in capsys.readouterr().err
