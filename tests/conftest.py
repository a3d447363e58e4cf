"""Test setup: Triton runs through its interpreter on the CPU, inputs are fresh random.

TRITON_INTERPRET must be set before triton is first imported (it decides then), hence
here, before anything imports gen. HF_HUB_OFFLINE=1 makes any stray hub call fail fast,
and GEN_CACHE_DIR points the tiny-model cache at a temporary folder. Set TRITON_INTERPRET=0 yourself to run the compiled
kernels on a GPU.

Every test that draws random numbers takes the ``seed`` fixture: a new seed each run
(``GEN_TEST_SEED=N`` replays one), printed with any failure.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach a model hub

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _gen_cache_dir(tmp_path_factory):
    """Tiny models are built once per session into a temporary cache, never into ~/.cache."""
    before = os.environ.get("GEN_CACHE_DIR")
    os.environ["GEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("gen-cache"))
    yield
    if before is None:
        os.environ.pop("GEN_CACHE_DIR", None)
    else:
        os.environ["GEN_CACHE_DIR"] = before


@pytest.fixture
def seed(request):
    value = int(os.environ.get("GEN_TEST_SEED") or random.SystemRandom().randrange(2**31))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("random seed", f"replay with GEN_TEST_SEED={value}"))
