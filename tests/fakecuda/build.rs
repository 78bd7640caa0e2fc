//! On Linux the library is built as `libfakecuda.so` but carries the SONAME `libcuda.so`:
//! once a test has loaded it by path, glibc's `dlopen("libcuda.so")` (what cudarc does)
//! matches the already-loaded object by that name instead of searching for the real
//! driver. (Windows matches a loaded DLL by its file name: the tests load a copy named
//! `nvcuda.dll`.)
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so");
    }
}
