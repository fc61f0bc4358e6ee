"""Deblurring (task: deblur): a residual restoration network on a classification backbone, blurred /
sharp pairs made on the fly, PSNR / SSIM, the classifier's top-1 on restored images, and export."""
