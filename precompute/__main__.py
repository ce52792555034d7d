from shards.config import load_config, run_cli

from .config import PrecomputeConfig


def main(argv):
    cfg = load_config(PrecomputeConfig, argv)
    from .run import run, summary  # heavy imports only after the config is known to be good

    manifest = run(cfg)
    print(summary(manifest, cfg.out.dir))


if __name__ == "__main__":
    run_cli("precompute", main, schema=PrecomputeConfig)
