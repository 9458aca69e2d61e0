import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "full_size: full SD v1.5-size models (~1 B parameters): ~1-2 min, ~4.5 GB RAM, ~9 GB temporary files"
    )


import pytest
import torch


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def few_threads(request):
    """One torch thread (a CPU actor's), then two: the counts on which sdcore computes a sample alike in any batch
    (sdcore.batching)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) for the whole session; see tests/s3server.py.

    Tests share it: use a bucket of your own (`s3_server.make_bucket("my-test")`), and a test
    that calls `stop()` must `start()` it again (in a `finally`) — same endpoint, same data.
    """
    from tests.s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def full_sd15_folder(tmp_path_factory):
    """A diffusers folder of random full-size SD v1.5 weights (the release's configs), written once per
    session for the generation-mode tests; the reference models are freed once saved."""
    import gc
    import shutil

    from tests.reference import reference_text_encoder, reference_unet, reference_vae, sd15_config, write_diffusers_folder

    root = tmp_path_factory.mktemp("sd15-modes")
    folder = write_diffusers_folder(root / "model", reference_unet(sd15_config("unet")), reference_vae(sd15_config("vae")),
                                    reference_text_encoder(sd15_config("text_encoder")))
    gc.collect()
    yield folder
    shutil.rmtree(root)  # 4.3 GB
