"""BLIP models: ViT image encoder, MED text model and the task models (see DESIGN.md)."""
