"""A Google Cloud Storage emulator for the tests: gcp-storage-emulator in this process, on a free port, with every
client (gcsfs through etils.epath, TensorStore for Orbax, google-cloud-storage for TensorBoard) pointed at it
through the environment, which CLI subprocesses inherit. Loaded as a plugin by conftest.py."""

from __future__ import annotations

import copy
import socket

import pytest


def _send_generation_on_reads() -> None:
    """TensorStore (Orbax's writer) reads an object's generation from the x-goog-generation header of its
    download, as GCS sends it; the emulator does not ("Malformed StorageGeneration" without this)."""
    import gcp_storage_emulator.server as server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    plain = objects.download
    if getattr(plain, "sends_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj.get("metageneration", "1")
        except NotFound:
            pass
        return plain(request, response, storage, *args, **kwargs)

    download.sends_generation = True
    objects.download = download
    server.HANDLERS = tuple(
        (route, {method: download if f is plain else f for method, f in handlers.items()})
        for route, handlers in server.HANDLERS
    )


@pytest.fixture(scope="session")
def gcs_server():
    from gcp_storage_emulator.server import create_server

    _send_generation_on_reads()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
    server.start()
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.stop()  # its thread is not a daemon: the session would not end


def use_the_bucket(gcs_server, patch: pytest.MonkeyPatch) -> str:
    """Empty the bucket and point every client at it, through `patch` (undone with it); returns its URL."""
    import fsspec

    server, host = gcs_server
    env = {
        "STORAGE_EMULATOR_HOST": host,  # gcsfs and google-cloud-storage
        "FSSPEC_GCS_TOKEN": "anon",  # read by fsspec when imported (subprocesses)
        "TENSORSTORE_GCS_HTTP_URL": host,  # Orbax's TensorStore
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "GOOGLE_CLOUD_PROJECT": "test",  # tensorboardX's writer
    }
    for name, value in env.items():
        patch.setenv(name, value)
    patch.setitem(fsspec.config.conf, "gcs", {**fsspec.config.conf.get("gcs", {}), "token": "anon"})
    server.wipe(keep_buckets=True)
    forget_listings()
    return "gs://bucket"


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """An empty bucket `gs://bucket`, and the environment that points every client at it."""
    yield use_the_bucket(gcs_server, monkeypatch)
    forget_listings()


def saved_bucket(gcs_server) -> dict:
    """A copy of everything the emulator holds, which `restore_bucket` puts back into a later test's emptied
    bucket, so that a slow run made once serves several tests. The emulator keeps it all in plain objects in
    memory: copied in milliseconds, where reading the objects back through its HTTP API takes seconds."""
    server, _ = gcs_server
    return copy.deepcopy(vars(server._storage))


def restore_bucket(gcs_server, saved: dict) -> None:
    server, _ = gcs_server
    vars(server._storage).update(copy.deepcopy(saved))
    forget_listings()


def forget_listings() -> None:
    """Drop every cached client: a gcsfs client caches object listings (sizes included), and etils.epath keeps
    its own client; one left from an earlier test would read an object rewritten since by a CLI subprocess at its
    old, shorter size."""
    import gcsfs
    from etils.epath import backend

    gcsfs.GCSFileSystem.clear_instance_cache()
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()
