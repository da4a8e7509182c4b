"""Start the moto server with amiflow's shim applied, on a loopback port.

moto only runs extensions that were imported into the process that serves, so this launcher
applies the shim first and then serves moto's WSGI app itself (``moto_server`` would not load it).

Contract with the Rust harness (crates/emulator): bind ``--host``/``--port`` (port 0 lets the OS
choose a free port, so two emulators never race for one), then print exactly one JSON line
``{"event": "ready", "port": N, "pid": P}`` on stdout once the socket accepts connections. SIGTERM or
SIGINT shuts the server down and exits 0.
"""

import argparse
import json
import os
import signal
import sys
import threading

# Must be set before moto is imported: without it moto accepts any AMI id anywhere.
os.environ.setdefault("MOTO_ENABLE_AMI_VALIDATION", "true")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="stop when stdin closes, so an emulator owned by a test dies with it even on SIGKILL",
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import amiflow_shim

    amiflow_shim.apply()

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = amiflow_shim.wrap_app(DomainDispatcherApplication(create_backend_app))
    server = make_server(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)
    port = server.server_address[1]
    # moto builds some URLs (SQS queue URLs among them) from MOTO_PORT.
    os.environ["MOTO_PORT"] = str(port)

    def stop(_signum, _frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    if args.exit_on_stdin_eof:
        def watch_parent():
            sys.stdin.read()
            stop(None, None)

        threading.Thread(target=watch_parent, daemon=True).start()

    amiflow_shim.start_background(app)
    print(json.dumps({"event": "ready", "port": port, "pid": os.getpid()}), flush=True)
    server.serve_forever()
    amiflow_shim.stop_background()
    # Exit without interpreter finalisation: tearing down moto's in-memory backends after a long
    # test session took seconds (over ten on a loaded CI machine), and there is nothing to save.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
