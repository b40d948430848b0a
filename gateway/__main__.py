"""`python -m gateway -c gateway.yaml`: the same as `infergate gateway`."""

import argparse
import sys

from gateway.app.cli import gateway_parser, run_gateway

if __name__ == "__main__":
    parser = gateway_parser(argparse.ArgumentParser(prog="python -m gateway"))
    sys.exit(run_gateway(parser.parse_args()))
