mod cache;
mod compression;
