//! The unit of data: an [`Image`] (channels-first f32 pixels) and a [`Sample`] (an image and its
//! class label), as datasets produce them and transforms consume them.

use crate::tensor::Tensor;
use crate::{Error, Result};

/// An image as channels-first (CHW) `f32` pixels in row-major order: `data[(c * h + y) * w + x]`.
///
/// Images decoded from bytes hold 0.0 ..= 255.0 until [`ToFloat`](super::ToFloat) scales them to
/// [0, 1]; see the [module docs](super) for the whole convention.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    channels: usize,
    height: usize,
    width: usize,
    data: Vec<f32>,
}

impl Image {
    /// An image of the given size; errors if `data.len()` is not `channels * height * width`.
    pub fn new(channels: usize, height: usize, width: usize, data: Vec<f32>) -> Result<Self> {
        let n = channels * height * width;
        if data.len() != n {
            return Err(Error::shape("image data", format!("{n} values for {channels}x{height}x{width}"), data.len()));
        }
        Ok(Image { channels, height, width, data })
    }

    /// An image of zeros.
    pub fn zeros(channels: usize, height: usize, width: usize) -> Self {
        Image { channels, height, width, data: vec![0.0; channels * height * width] }
    }

    /// An image from bytes already in CHW order (as IDX and CIFAR-10 store them).
    pub fn from_chw_u8(channels: usize, height: usize, width: usize, bytes: &[u8]) -> Result<Self> {
        Image::new(channels, height, width, bytes.iter().map(|&b| b as f32).collect())
    }

    /// An image from bytes in interleaved HWC order (as image decoders return them).
    pub fn from_hwc_u8(height: usize, width: usize, channels: usize, bytes: &[u8]) -> Result<Self> {
        let n = channels * height * width;
        if bytes.len() != n {
            return Err(Error::shape(
                "HWC image bytes",
                format!("{n} bytes for {height}x{width}x{channels}"),
                bytes.len(),
            ));
        }
        let plane = height * width;
        let mut data = vec![0.0; n];
        for (p, px) in bytes.chunks_exact(channels).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                data[c * plane + p] = v as f32;
            }
        }
        Image::new(channels, height, width, data)
    }

    /// An image from a `[C, H, W]` tensor.
    pub fn from_tensor(t: Tensor) -> Result<Self> {
        match *t.shape() {
            [c, h, w] => Image::new(c, h, w, t.into_data()),
            _ => Err(Error::shape("image tensor", "rank 3 [C, H, W]", format!("{:?}", t.shape()))),
        }
    }

    /// The image as a `[C, H, W]` tensor.
    pub fn into_tensor(self) -> Tensor {
        Tensor::new(&[self.channels, self.height, self.width], self.data)
            .expect("an Image's length is C*H*W by construction")
    }

    /// Channels (1 grey, 3 RGB).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// `[channels, height, width]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }

    /// The value at channel `c`, row `y`, column `x`. Panics if out of range, as slice indexing does.
    pub fn pixel(&self, c: usize, y: usize, x: usize) -> f32 {
        assert!(c < self.channels && y < self.height && x < self.width);
        self.data[(c * self.height + y) * self.width + x]
    }

    /// Channel `c` as a `height * width` slice.
    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.data[c * n..(c + 1) * n]
    }

    /// The values, channel by channel (CHW).
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The values, mutable (CHW).
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// The values, taken out (CHW).
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// `"CxHxW"`, for messages.
    pub(crate) fn dims(&self) -> String {
        format!("{}x{}x{}", self.channels, self.height, self.width)
    }
}

/// One item of a dataset: an image and its class label.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The image.
    pub image: Image,
    /// Its class label.
    pub label: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hwc_bytes_become_chw_planes() {
        // 1x2 RGB: pixel 0 = (1, 2, 3), pixel 1 = (4, 5, 6).
        let img = Image::from_hwc_u8(1, 2, 3, &[1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!(img.shape(), [3, 1, 2]);
        assert_eq!(img.data(), &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(img.pixel(2, 0, 1), 6.0);
        assert_eq!(img.plane(1), &[2.0, 5.0]);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        assert!(Image::new(1, 2, 2, vec![0.0; 3]).is_err());
        assert!(Image::from_hwc_u8(2, 2, 3, &[0; 11]).is_err());
        let err = Image::from_tensor(Tensor::zeros(&[2, 2])).unwrap_err();
        assert!(err.to_string().contains("[C, H, W]"), "{err}");
        let t = Image::zeros(2, 3, 4).into_tensor();
        assert_eq!(t.shape(), &[2, 3, 4]);
        assert_eq!(Image::from_tensor(t).unwrap(), Image::zeros(2, 3, 4));
    }
}
