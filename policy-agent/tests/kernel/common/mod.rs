#![allow(dead_code)]
pub mod packet;
