"""A real S3 server for wasnap's tests: moto, serving one request at a time.

Stock moto lets two conditional writers (`If-None-Match: *`) both win for bodies over
~5 MB: the body spills to a temporary file between moto's existence check and its insert,
and another request slips in between. Serving its WSGI app under a lock, one request at
a time, closes that window. Everything is in memory: one fresh server per test run.

Usage: s3_server.py --port-file FILE --bucket NAME [--port N] [--parent-pid PID]
Listens on 127.0.0.1 (a free port unless --port is given), creates the bucket with a
signed client, then writes the port to FILE. With --parent-pid it exits when that
process is gone, so a test run that dies cannot leave a server behind.
"""

import argparse
import os
import threading
import time

import boto3
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server


def serialized(app):
    lock = threading.Lock()

    def handle(environ, start_response):
        with lock:
            # Drain the response under the lock too: the request is done only when it is sent.
            return list(app(environ, start_response))

    return handle


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args()

    app = serialized(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", args.port, app, threaded=True, request_handler=MotoRequestHandler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()

    boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    ).create_bucket(Bucket=args.bucket)

    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.rename(tmp, args.port_file)

    while True:
        time.sleep(0.5)
        if args.parent_pid is not None:
            try:
                os.kill(args.parent_pid, 0)
            except ProcessLookupError:
                break
    server.shutdown()


if __name__ == "__main__":
    main()
