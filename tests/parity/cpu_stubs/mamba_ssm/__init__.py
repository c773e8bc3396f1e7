"""CPU stand-in for mamba_ssm (dry runs of the parity harness only; see ../README.md)."""
__version__ = "0.0-cpu-stub"
