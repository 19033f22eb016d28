mod cli;
mod dead_letters;
mod delivery;
mod helpers;
mod poison;
mod restart;
mod retries;
