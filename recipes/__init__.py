"""The shipped recipes, installed as package data (finetune.recipes) so wheels carry them."""
