//! The synthetic image task of go-metal's CNN tutorial (`generateImageData`): each image's colour
//! intensity encodes its class, darkening away from the centre, with uniform noise.

use crate::rng::Rng;
use crate::tensor::Tensor;

/// `count` NCHW images of `channels x height x width` and their class labels, drawn from `rng`
/// exactly as the tutorial's generator does (class uniform in `0..classes`; intensity
/// `class / (classes - 1) + 0.2 * channel - 0.3 * distance^2 + noise`, clamped to [0, 1]).
pub fn tutorial_images(
    count: usize,
    channels: usize,
    height: usize,
    width: usize,
    classes: usize,
    rng: &mut Rng,
) -> (Tensor, Vec<u32>) {
    let size = channels * height * width;
    let mut data = vec![0f32; count * size];
    let mut labels = Vec::with_capacity(count);
    let (ch, cw) = (height as f32 / 2.0, width as f32 / 2.0);
    for i in 0..count {
        let class = rng.below(classes as u64) as usize;
        labels.push(class as u32);
        let base_intensity = class as f32 / (classes.max(2) - 1) as f32;
        for c in 0..channels {
            let boost = c as f32 * 0.2;
            for h in 0..height {
                for w in 0..width {
                    let dist = ((h as f32 - ch).powi(2) + (w as f32 - cw).powi(2)) / (ch * ch);
                    let noise = (rng.uniform() - 0.5) * 0.2;
                    let v = (base_intensity + boost - dist * 0.3 + noise).clamp(0.0, 1.0);
                    data[i * size + c * height * width + h * width + w] = v;
                }
            }
        }
    }
    (Tensor::new(&[count, channels, height, width], data).expect("sizes agree"), labels)
}
