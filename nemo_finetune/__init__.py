"""The machinery behind the four scripts (peft_megatron.py, dataset_module.py, test_checkpoint.py,
convert_checkpoint_to_hf.py), one job a module; docs/ARCHITECTURE.md maps them. Importing the package imports
nothing heavy: each module imports NeMo, Megatron-Core or torch inside the functions that need them."""
