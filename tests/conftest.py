"""Shared fixtures and helpers. `make test` (pytest -q tests) runs everything; `pytest -m "not slow" tests` is the quick loop."""
import ast
import gc
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The tests run tiny models whose matrix products take microseconds: with several threads the
# OpenMP hand-offs cost far more than the work (seen here: 5 s vs 0.06 s for the same evaluation
# when another process shares the 2 cores). One thread, here and in every subprocess a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite is the CPU contract (CI has no GPU): several tests build reference tensors and models on
# the CPU and compare them with what the code loads on the default device, which on a GPU machine is
# CUDA. Hide CUDA so every test runs where it is meant to; benchmarks/gpu_check.sh covers the GPU path.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _freeze_gc():
    """Every gc.collect() walks all the objects the process holds, and the study's release_memory() calls it
    after each model: with torch, transformers and the test modules loaded that is ~0.25 s a call (the
    small ladder alone spent 12 of its 22 s there). At the start of each test module what is still alive
    (imported modules, session fixtures) lives on, so it goes to the permanent generation, which
    collections skip; the garbage is collected first, and objects made later are collected as before."""
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(scope="module")
def tiny():
    """The tiny random Qwen2 model (built in code, fp32, grouped-query attention)."""
    from iclvsft.models import load_model

    return load_model("tiny-random-qwen2")


@pytest.fixture(scope="session")
def root() -> Path:
    """The repository's root folder (configs/, the scripts)."""
    return ROOT


@pytest.fixture(scope="session")
def make_data(tmp_path_factory):
    """``make_data(overrides)``: a data folder generated with ``overrides`` of the default config (seconds)."""
    from iclvsft.config import load_config
    from iclvsft.data import generate

    def make(overrides):
        out = tmp_path_factory.mktemp("data")
        generate(load_config(None, overrides), out, show_progress=False)
        return out

    return make


# The small data settings shared by the tests that only need a few rows of expression and boolean.
SMALL_DATA = ["data.tasks=[expression,boolean]", "data.train_pattern=16", "data.train_control=0", "data.test_pattern=3",
              "data.test_control=3"]


@pytest.fixture(scope="session")
def small_data(make_data) -> Path:
    """A data folder made with SMALL_DATA, shared read-only by the whole session (never write into it)."""
    return make_data(SMALL_DATA)


def run_all(*commands, **kwargs) -> list[subprocess.CompletedProcess]:
    """``subprocess.run(command, capture_output=True, text=True, **kwargs)`` for independent commands, two at a
    time (the test process itself uses one core of two), in the order given."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda c: subprocess.run(c, capture_output=True, text=True, **kwargs), commands))


def free_port() -> int:
    """A free TCP port on localhost, for a two-process launch's --main_process_port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ast_bool(node) -> bool:
    """A True/False expression's value from Python's own parse, walked by hand (no eval): the second route
    the boolean tasks' answers are checked against (tests/test_tasks.py, tests/test_authors_data.py)."""
    if isinstance(node, ast.Expression):
        return ast_bool(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BoolOp):
        values = [ast_bool(v) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    raise AssertionError(f"unexpected node {ast.dump(node)}")
