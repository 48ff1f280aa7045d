#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmesh::fuzzing::structured_output(data));
