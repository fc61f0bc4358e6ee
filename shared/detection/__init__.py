"""Object detection: the data (COCO, Pascal VOC, TF Object Detection API records), anchors, model, losses."""
