//! Classifies a stream of handwritten digits kept in flash (the first 32
//! test images, standing in for a sensor) with the int8 MoE model, and logs
//! over RTT (defmt) each image's class, its expert and the inference time
//! from the RP2040's 1 MHz hardware timer.
#![no_std]
#![no_main]

use defmt_rtt as _;
use micromoe::{Model, include_model, scratch_len};
use panic_probe as _;
use rp2040_hal::{self as hal, pac};

/// The second-stage bootloader for the Pico's W25Q080 flash.
#[unsafe(link_section = ".boot2")]
#[used]
pub static BOOT2_FIRMWARE: [u8; 256] = rp2040_boot2::BOOT_LOADER_W25Q080;

const MODEL: &[u8] = include_model!("../../../models/digits/digits_int8.moe");
/// Images as the host wrote them: a 24-byte header, then 64 f32 pixels each.
const STREAM: &[u8] = include_bytes!("../../vectors/digits_int8.bin");
const XTAL_HZ: u32 = 12_000_000;

fn pixel(image: usize, i: usize) -> f32 {
    let at = 24 + 4 * (64 * image + i);
    STREAM.get(at..at + 4).map_or(0.0, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[hal::entry]
fn main() -> ! {
    let Some(mut p) = pac::Peripherals::take() else { panic!("peripherals taken twice") };
    let mut watchdog = hal::Watchdog::new(p.WATCHDOG);
    let Ok(clocks) = hal::clocks::init_clocks_and_plls(
        XTAL_HZ,
        p.XOSC,
        p.CLOCKS,
        p.PLL_SYS,
        p.PLL_USB,
        &mut p.RESETS,
        &mut watchdog,
    ) else {
        panic!("clock setup failed")
    };
    let timer = hal::Timer::new(p.TIMER, &mut p.RESETS, &clocks);

    let model = match Model::parse(MODEL) {
        Ok(m) => m,
        Err(e) => panic!("model refused: {}", e),
    };
    let mut scratch = [0u8; scratch_len!(MODEL)];
    for image in 0..32 {
        let mut x = [0.0f32; 64];
        for (i, v) in x.iter_mut().enumerate() {
            *v = pixel(image, i);
        }
        let mut scores = [0.0f32; 10];
        let (mut expert, mut weight) = (0u16, 0.0f32);
        let start = timer.get_counter();
        let result = model.infer_observed(&x, &mut scores, &mut scratch, |step| {
            if let Some(c) = step.selection.first() {
                (expert, weight) = (c.expert, c.weight);
            }
        });
        let micros = (timer.get_counter() - start).to_micros();
        match result {
            Ok(()) => {
                let class = scores
                    .iter()
                    .enumerate()
                    .fold((0, f32::MIN), |b, (i, &s)| if s > b.1 { (i, s) } else { b })
                    .0;
                defmt::info!(
                    "image {}: class {}, expert {} (weight {}), {} us",
                    image,
                    class,
                    expert,
                    weight,
                    micros
                );
            }
            Err(e) => defmt::error!("image {}: {}", image, e),
        }
    }
    loop {
        cortex_m::asm::wfi();
    }
}
