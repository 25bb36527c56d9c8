"""The personalization workbench in a browser: `python app.py [--preset presets/tiny.yaml] [--public]`.

Layout and wiring live in workbench/app/; generation and scoring in the library. On a Hugging Face
Space (SPACE_ID set) the app runs in public mode: allow-listed models only, capped studies.
"""

import argparse

from workbench.app import build_app, default_config, launch_options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="study to open with (default: presets/ip-adapter-weights-sd15.yaml)")
    parser.add_argument("--public", action="store_true", help="allow-listed models only, no typed paths")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 to serve a LAN)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or $GRADIO_SERVER_PORT)")
    parser.add_argument("--queue-size", type=int, default=16, help="jobs that may wait for the GPU")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE to add its methods or metrics (repeatable; also $WORKBENCH_PLUGINS)")
    parser.add_argument("--share", action="store_true", help="also serve through a gradio.live link")
    args = parser.parse_args()
    config = default_config(args.preset, args.public, queue_size=args.queue_size, plugins=tuple(args.plugin))
    demo = build_app(config)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share or None, **launch_options(config))


if __name__ == "__main__":
    main()
