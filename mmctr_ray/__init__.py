"""mmctr_ray: multimodal CTR prediction on Ray."""
