//! `cellmorph devices`.

use cellmorph::backend::{cuda_compiled, cuda_device_count, emulation_compiled};
use cellmorph::{Backend, Device, Result};

pub fn run() -> Result<()> {
    println!(
        "cpu       available ({} threads)",
        rayon::current_num_threads()
    );
    if emulation_compiled() {
        println!("emulated  available (CUDA kernels run as host C++; for tests, slow)");
    } else {
        println!("emulated  unavailable: the kernels did not compile as host C++ in this build");
    }
    if !cuda_compiled() {
        println!("cuda      unavailable: CUDA kernels were not compiled into this build (no nvcc at build time)");
        return Ok(());
    }
    match cuda_device_count() {
        0 => println!("cuda      unavailable: no CUDA driver or GPU on this machine"),
        n => {
            for i in 0..n {
                match Backend::new(Device::Cuda(i)) {
                    Ok(be) => println!("cuda:{i}    {}", be.describe()),
                    Err(e) => println!("cuda:{i}    unavailable: {e}"),
                }
            }
        }
    }
    Ok(())
}
