"""The torch backend never holds a [B, N] matrix: peak extra memory measured by the OS (RSS) in a fresh process."""
import pytest

from benchmarks.harness import peak_extra_rss

pytestmark = pytest.mark.slow       # fresh processes that allocate up to a GiB: 4-30 s each

MiB = 2 ** 20


@pytest.mark.parametrize("B,d", [(8192, 16), (16384, 64)])
def test_torch_backend_peak_memory_is_chunk_sized(B, d):
    # One [B, N] float32 matrix is 256 MiB at B = 8192 and 1 GiB at B = 16384; the unfused loss holds about a dozen.
    result = peak_extra_rss("benchmarks.steps:make_step", dict(impl="torch", B=B, N=B, d=d, dr=d))
    assert "error" not in result, result
    one_matrix = B * B * 4
    assert result["peak_extra_bytes"] < min(128 * MiB, one_matrix / 2), result


def test_measurement_sees_a_materialized_matrix():
    """The measurement can fail: the dense reference backend holds [B, N] matrices and is caught."""
    result = peak_extra_rss("benchmarks.steps:make_step", dict(impl="reference", B=4096, N=4096, d=16, dr=16))
    assert result["peak_extra_bytes"] > 4096 * 4096 * 4, result
