from shards.common.config import load_config, run_cli

from .config import PrecomputeConfig


def main(argv):
    cfg = load_config(PrecomputeConfig, argv)
    from .run import run, summary  # heavy imports only after the config is known to be good

    print(summary(run(cfg), cfg.out.dir))


def command(argv):
    run_cli("precompute", main, argv, schema=PrecomputeConfig)


if __name__ == "__main__":
    import sys

    command(sys.argv[1:])
