"""CPU stand-in for the few torchvision transforms the original uses (dry runs only; see ../README.md)."""
