#![no_main]
//! `tope_ota::fuzz::request`: its property is stated there.

#[global_allocator]
static ALLOC: tope_ota::fuzz::CappedAlloc = tope_ota::fuzz::CappedAlloc;

libfuzzer_sys::fuzz_target!(
    init: tope_ota::fuzz::CappedAlloc::abort_over_cap(),
    |data: &[u8]| tope_ota::fuzz::request(data)
);
