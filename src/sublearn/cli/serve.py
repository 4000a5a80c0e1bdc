from __future__ import annotations

import argparse

from sublearn.models.dtype import DTYPE_CHOICES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="embedded name, HF id, local model folder or "
                   "PEFT adapter folder (default: embedded smollm2-135m-instruct)")
    p.add_argument("--served-model-name", default=None,
                   help="name clients pass as 'model' (default: the --model value)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; the server has no authentication, keep it local")
    p.add_argument("--port", type=int, default=8000, help="port (0 = pick a free one)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES),
                   help="compute dtype (default: auto, bfloat16 on a CPU with native bf16 "
                        "matmuls, float32 elsewhere)")
    p.add_argument("--batch-size", type=int, default=64, help="max rows per generation batch")
    p.add_argument("--fail-every", type=int, default=0, metavar="N",
                   help="testing: every Nth chat request fails with HTTP 429 or 500 (0 = never)")


def run(args: argparse.Namespace) -> int:
    from sublearn.backends.serve import make_server
    from sublearn.errors import SublearnError

    if args.fail_every < 0 or args.batch_size <= 0:
        raise SublearnError("--fail-every must be >= 0 and --batch-size positive")
    if not 0 <= args.port <= 65535:  # checked before the model loads
        raise SublearnError(f"--port must be 0-65535 (0: a free one), got {args.port}")
    try:
        server = make_server(args.model, args.host, args.port, args.fail_every,
                             args.served_model_name, args.dtype, args.batch_size)
    except OSError as e:
        raise SublearnError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    # One parseable line (tests and scripts read the port from it when --port 0).
    print(f"sublearn serve: model '{server.model_name}' on {server.base_url} "
          f"port={server.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is the normal way to stop a server, not an error
        print("sublearn serve: stopped", flush=True)
    finally:
        server.httpd.server_close()
    return 0
